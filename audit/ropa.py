"""Record of processing activities (GDPR Art. 30), per mapping: purposes, lawful basis, categories of data
subjects and personal data, recipients, transfers, protection measures and retention — from the mapping —
with what the trail shows was actually done (runs, records per entity, first and last run)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from crmbridge.audit.canonical import COLUMNS, event_of
from crmbridge.audit.store import AuditStore
from crmbridge.mappings.model import Mapping


def record_of_processing(mapping: Mapping, store: AuditStore) -> dict[str, Any]:
    audit = mapping.audit
    categories: dict[str, list[str]] = {}
    protection: list[dict[str, str]] = []
    for entity in mapping.entities:
        for spec in entity.fields.values():
            if spec.personal_data:
                categories.setdefault(spec.personal_data, []).append(f"{entity.name}.{spec.name}")
            protect = getattr(spec, "protect", "none")
            if spec.personal_data or protect != "none":
                protection.append({"field": f"{entity.name}.{spec.name}", "category": spec.personal_data or "",
                                   "protection": protect, "masked_in_previews": spec.mask})
    recipients = list(audit.recipients) or [f"{n} ({c.type})" for n, c in mapping.targets.items()]
    runs, records = _activity(mapping, store)
    return {
        "controller_activity": mapping.name,
        "mapping_sha256": mapping.sha256,
        "purposes": [audit.purpose] if audit.purpose else [],
        "lawful_basis": audit.lawful_basis,
        "data_subject_categories": list(audit.data_subjects),
        "personal_data_categories": categories,
        "sources": [f"{n} ({c.type})" for n, c in mapping.sources.items()],
        "recipients": recipients,
        "transfers": list(audit.transfers),
        "protection_measures": {
            "fields": protection,
            "audit_trail": "append-only, SHA-256 hash chain, Ed25519-signed checkpoints per run; data subjects and "
                           "source keys only as keyed-hash references",
            "keyring": "sealed keyring with per-field keys" if mapping.protection is not None else None,
        },
        "retention": {"audit_events_days": audit.retention_days},
        "activity": {"runs": runs, "records": records},
    }


def _activity(mapping: Mapping, store: AuditStore) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    mark = store.placeholder
    starts = []
    run_ids: set[str] = set()
    for row in store.rows(f"action = {mark}", ["run_started"]):
        event = event_of(dict(zip(COLUMNS, row, strict=True)))
        if event.get("mapping") == mapping.name:
            starts.append(event["time"])
            run_ids.add(event["run_id"])
    records: dict[str, dict[str, int]] = {}
    if run_ids:
        marks = ", ".join([mark] * len(run_ids))
        with store.engine.connect() as conn:
            for entity, action, n in conn.exec_driver_sql(
                    f"SELECT entity, action, count(*) FROM audit_events WHERE run_id IN ({marks}) "
                    "AND action LIKE 'record%' GROUP BY entity, action", tuple(sorted(run_ids))):
                records.setdefault(entity, {})[action.removeprefix("record_")] = n
    return {"count": len(run_ids), "first": min(starts, default=None), "last": max(starts, default=None)}, records


def to_json(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2, ensure_ascii=False)


def to_csv(record: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["item", "value"])
    for key in ("controller_activity", "mapping_sha256", "lawful_basis"):
        writer.writerow([key, record[key] or ""])
    for key in ("purposes", "data_subject_categories", "sources", "recipients", "transfers"):
        writer.writerow([key, "; ".join(record[key])])
    for category, fields in record["personal_data_categories"].items():
        writer.writerow([f"personal_data:{category}", "; ".join(fields)])
    for field in record["protection_measures"]["fields"]:
        writer.writerow([f"protection:{field['field']}", field["protection"]])
    writer.writerow(["retention_days", record["retention"]["audit_events_days"]])
    writer.writerow(["runs", record["activity"]["runs"]["count"]])
    return out.getvalue()
