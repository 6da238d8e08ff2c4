"""Record-level events from the flow's steps: which source record became which target record, in which run,
for which data subject (by reference) — the lineage a compliance officer searches. Called once per batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from crmbridge.audit.trail import AuditTrail
from crmbridge.mappings.model import Entity


def _list(values: Any) -> list[Any]:
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


def _pick(values: list[Any], rows: Sequence[int]) -> list[Any]:
    return values if isinstance(rows, range) and len(rows) == len(values) else [values[i] for i in rows]


def subject_values(mapping: Any, entity: Entity, names: list[str], desired: list[list[Any]],
                   external_ids: list[str]) -> list[Any] | None:
    """The subject field's plaintext for each row (aligned with `desired`), or None when the entity names no
    subject or its values cannot be recovered (hashed, dropped). Never leaves the process: only its keyed
    reference is written."""
    subject = getattr(entity, "subject", None)
    if not subject or subject not in names:
        return None
    column = desired[names.index(subject)]
    protect = getattr(entity.fields[subject], "protect", "none")
    if protect == "none":
        return column
    try:
        from crmbridge.protection.mapping_rules import receives_plaintext
        from crmbridge.protection.policy import ENCRYPTED, protector_for
    except ImportError:
        return None
    if protect not in ENCRYPTED:
        return None
    if receives_plaintext(mapping, entity.target):
        return column  # the load step decrypted it for the target already
    return protector_for(mapping).decrypt_values(entity.name, subject, column, external_ids)


def loaded(audit: AuditTrail, mapping: Any, entity: Entity, table: Any, names: list[str], desired: list[list[Any]],
           ledger_rows: Sequence[int], keys: Any, target_keys: Any, actions: list[str],
           changed_fields: list[list[str] | None]) -> None:
    """record_created / record_updated per loaded row (unchanged rows are counted on batch_loaded only)."""
    if not audit.record_level or not actions:
        return
    subjects_all = subject_values(mapping, entity, names, desired, table.column("_ext").to_pylist())
    subjects = None if subjects_all is None else _pick(subjects_all, ledger_rows)
    keys, targets = _list(keys), _list(target_keys)
    for action in ("created", "updated"):
        rows = [i for i, a in enumerate(actions) if a == action]
        if not rows:
            continue
        every = len(rows) == len(actions)
        audit.records(f"record_{action}", entity.name, keys if every else [keys[i] for i in rows],
                      target_ids=targets if every else [targets[i] for i in rows],
                      subjects=None if subjects is None else subjects if every else [subjects[i] for i in rows],
                      fields=None if action == "created" else [changed_fields[i] for i in rows])


def quarantined(audit: AuditTrail, entity: Entity, records: Sequence[Any]) -> None:
    """record_quarantined per quarantined row: source key reference and reason code, never the detail text."""
    if audit.record_level and records:
        audit.records("record_quarantined", entity.name, [r.source_key for r in records],
                      reasons=[r.reason for r in records])
