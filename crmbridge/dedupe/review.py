"""The review file: pairs scored between the two thresholds, for a person to approve or reject.

Decisions are keyed by the rows' external ids (deterministic, and not personal data) and applied on the next
run; values are shown through each field's `mask` so the file holds no more than a preview would."""

from __future__ import annotations

import csv
from pathlib import Path

from crmbridge.errors import CrmbridgeError

DECISIONS = {"approve": "approve", "approved": "approve", "yes": "approve",
             "reject": "reject", "rejected": "reject", "no": "reject", "": ""}
HEADER = ["left_id", "right_id", "left_row", "right_row", "score", "decision"]


class ReviewFileError(CrmbridgeError):
    pass


def read(path: Path) -> dict[tuple[str, str], str]:
    """{(id, id) sorted: "approve" | "reject"} from a review file; no file, no decisions."""
    if not path.exists():
        return {}
    decisions: dict[tuple[str, str], str] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("left_id", "right_id", "decision") if c not in (reader.fieldnames or [])]
        if missing:
            raise ReviewFileError(f"{path}: line 1: missing column(s) {', '.join(missing)}; expected a header "
                                  f"starting {','.join(HEADER)}")
        for line, row in enumerate(reader, start=2):
            raw = (row.get("decision") or "").strip().lower()
            if raw not in DECISIONS:
                raise ReviewFileError(f"{path}: line {line}: column `decision` is `{raw}`; expected approve, "
                                      "reject or empty (undecided)")
            if DECISIONS[raw]:
                a, b = row["left_id"].strip(), row["right_id"].strip()
                decisions[(a, b) if a < b else (b, a)] = DECISIONS[raw]
    return decisions


def write(path: Path, rows: list[dict[str, object]], fields: list[str]) -> None:
    """Rewrite the review file: pending pairs and every decision taken so far."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = HEADER + [f"{f}_{side}" for f in fields for side in ("left", "right", "score")]
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
