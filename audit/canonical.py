"""The canonical serialisation of an event and the hash chain over it.

Canonical form: the event as JSON with its keys sorted, no whitespace, UTF-8, absent values left out —
exactly `json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`. Events without
free-form details (every record-level event) are built by concatenation in sorted key order, which is
that same text at a fraction of the cost (tests hold the two to be identical).
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import encode_basestring  # the C encoder json.dumps uses for str with ensure_ascii=False
from typing import Any

GENESIS = "0" * 64

# Stored columns, in table order; every other key of an event lives in `details`.
COLUMNS = ("seq", "time", "actor", "action", "run_id", "entity", "source_ref", "subject_ref", "target_id",
           "reason", "details", "prev_hash", "hash")
COLUMN_KEYS = frozenset(COLUMNS) - {"details", "prev_hash", "hash"}

# The column keys in sorted order, as they appear in canonical JSON ("seq" is the only integer).
_SORTED = ("action", "actor", "entity", "reason", "run_id", "seq", "source_ref", "subject_ref", "target_id", "time")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical(row: dict[str, Any]) -> str:
    """The canonical text of one stored row (columns plus `details` as a JSON object text or None)."""
    details = row.get("details")
    if details:
        event = json.loads(details) if isinstance(details, str) else dict(details)
        event.update({k: row[k] for k in COLUMN_KEYS if row.get(k) is not None})
        return dumps(event)
    parts = []
    for key in _SORTED:
        value = row.get(key)
        if value is None:
            continue
        parts.append(f'"{key}":{value}' if key == "seq" else f'"{key}":{encode_basestring(value)}')
    return "{" + ",".join(parts) + "}"


def canonical_row(row: tuple) -> str:
    """`canonical` for a stored row tuple (COLUMNS order) — the verifier's fast path, same text."""
    seq, time, actor, action, run_id, entity, source_ref, subject_ref, target_id, reason, details = row[:11]
    if details or seq is None or time is None or actor is None or action is None:
        return canonical(dict(zip(COLUMNS, row, strict=True)))
    enc = encode_basestring
    parts = ['{"action":', enc(action), ',"actor":', enc(actor)]
    if entity is not None:
        parts += [',"entity":', enc(entity)]
    if reason is not None:
        parts += [',"reason":', enc(reason)]
    if run_id is not None:
        parts += [',"run_id":', enc(run_id)]
    parts += [',"seq":', str(seq)]
    if source_ref is not None:
        parts += [',"source_ref":', enc(source_ref)]
    if subject_ref is not None:
        parts += [',"subject_ref":', enc(subject_ref)]
    if target_id is not None:
        parts += [',"target_id":', enc(target_id)]
    parts += [',"time":', enc(time), "}"]
    return "".join(parts)


def chain_hash(prev_hash: str, text: str) -> str:
    """SHA-256 over the previous event's hash and this event's canonical text."""
    return hashlib.sha256((prev_hash + text).encode()).hexdigest()


def event_of(row: dict[str, Any]) -> dict[str, Any]:
    """The event as a dictionary (columns and details merged), without the chain hashes."""
    return json.loads(canonical(row))
