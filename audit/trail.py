"""Append-only run events (no values, only names and counts)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


class AuditTrail:
    def __init__(self, path: Path, run_id: str, mapping_name: str, mapping_sha256: str, actor: str):
        self.path = path
        self.base = {"run_id": run_id, "mapping": mapping_name, "mapping_sha256": mapping_sha256, "actor": actor}

    def append(self, action: str, **details: Any) -> None:
        event = {"time": datetime.now(UTC).isoformat(), "action": action, **self.base, **details}
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event, default=str, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def events(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
