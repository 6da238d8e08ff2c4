"""Retention: events older than the retention period (never under the three-year floor) leave the live
store only after they are written to a signed archive. The archive ends at an anchor — the last archived
event's seq and hash, signed — and the live chain verifies on from that anchor, so it stays verifiable
across the cut, and the archive verifies on its own with the public key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from crmbridge.audit.canonical import dumps
from crmbridge.audit.signing import Signer, load_public_key, verify_signature
from crmbridge.audit.store import AuditStore
from crmbridge.audit.verify import VerifyResult, export_lines, verify_rows, verify_store
from crmbridge.errors import CrmbridgeError

RETENTION_FLOOR_DAYS = 1095  # PIPL Art. 56: at least three years
ANCHOR_TYPE = "crmbridge-audit-anchor"


class RetentionError(CrmbridgeError):
    """A purge was refused (too early, or the log does not verify)."""


@dataclass(frozen=True)
class PurgeResult:
    upto_seq: int
    purged: int
    archive: Path


def purge(store: AuditStore, signer: Signer, before: datetime, archive: Path, retention_days: int,
          now: datetime | None = None) -> PurgeResult:
    now = now or datetime.now(UTC)
    if retention_days < RETENTION_FLOOR_DAYS:
        raise RetentionError(f"retention of {retention_days} days is under the floor of {RETENTION_FLOOR_DAYS} "
                             "days (three years, PIPL Art. 56); purge refused")
    limit = now - timedelta(days=retention_days)
    if before > limit:
        raise RetentionError(f"events from before {before.date().isoformat()} are not yet past the "
                             f"{retention_days}-day retention (the latest allowed cut is {limit.date().isoformat()})"
                             "; purge refused")
    checked = verify_store(store, signer.public)
    if not checked.ok:
        raise RetentionError(f"the audit log does not verify (first bad event {checked.first_bad}); a tampered "
                             "log is never archived and purged")
    mark = store.placeholder
    with store.engine.connect() as conn:
        upto = conn.exec_driver_sql(f"SELECT max(seq) FROM audit_events WHERE time < {mark}",
                                    (before.astimezone(UTC).isoformat(),)).scalar()
    if upto is None:
        raise RetentionError(f"no event is older than {before.isoformat()}; nothing to purge")
    previous = store.anchor()
    archive.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with archive.open("w", encoding="utf-8") as handle:
        for line in export_lines(store, None, first_seq=(previous or {}).get("upto_seq", 0) + 1, last_seq=upto,
                                 anchor=previous):
            text = line + "\n"
            digest.update(text.encode())
            handle.write(text)
        head = store.hash_at(upto)
        body = dumps({"type": ANCHOR_TYPE, "upto_seq": upto, "hash": head, "archive_sha256": digest.hexdigest(),
                      "time": now.isoformat(), "key_id": signer.key_id, "before": before.isoformat()})
        signature = signer.sign(body)
        handle.write(json.dumps({"type": "anchor", "body": body, "signature": signature}) + "\n")
    purged = store.purge_through(upto, head, body, signature, signer.key_id)
    return PurgeResult(upto, purged, archive)


def verify_archive(path: Path, public_pem: str) -> VerifyResult:
    """An archive verifies on its own: its chain, its checkpoints, and the signed anchor at its end that
    covers the file's bytes and names its last event."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    last = json.loads(lines[-1])
    public = load_public_key(public_pem)
    body = json.loads(last["body"])
    from crmbridge.audit.verify import Finding, read_export

    temporary = path.with_suffix(".check.tmp")
    temporary.write_text("".join(lines[:-1]), encoding="utf-8")
    try:
        header, rows, cps = read_export(temporary)
    finally:
        temporary.unlink()
    result = verify_rows(rows, cps, header.get("anchor"), public)
    if last.get("type") != "anchor" or not verify_signature(public, last["body"], last["signature"]):
        result.findings.append(Finding(None, "anchor", "the archive's anchor signature does not verify"))
    if hashlib.sha256("".join(lines[:-1]).encode()).hexdigest() != body["archive_sha256"]:
        result.findings.append(Finding(None, "anchor", "the archive's contents do not match its signed digest"))
    if result.head != body["hash"] or result.last_seq != body["upto_seq"]:
        result.findings.append(Finding(result.last_seq, "anchor", "the archive does not end at its signed anchor"))
    return result
