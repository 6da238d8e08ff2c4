"""Where a project's audit trail lives and how it is keyed, resolved from the mapping's `settings.audit`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crmbridge.audit.signing import Signer
from crmbridge.audit.store import AuditStore, sqlite_url
from crmbridge.audit.subjects import HmacReferencer, KeyringReferencer, SubjectReferencer
from crmbridge.audit.trail import AuditTrail
from crmbridge.mappings.model import Mapping

RETENTION_FLOOR_DAYS = 1095  # PIPL Art. 56: keep the records at least three years


def audit_dir(mapping: Mapping) -> Path:
    return mapping.state_dir / "audit"


def store_url(mapping: Mapping) -> str:
    url = mapping.audit.url
    if not url:
        return sqlite_url(mapping.state_dir / "audit.db")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
        return sqlite_url(mapping.base_dir / url[len("sqlite:///"):])  # relative to the mapping, as sources are
    return url


def open_store(mapping: Mapping) -> AuditStore:
    return AuditStore(store_url(mapping))


def signer_for(mapping: Mapping, create: bool = True) -> Signer:
    return Signer.from_file(mapping.audit.signing_key or audit_dir(mapping) / "signing.key", create=create)


def referencer_for(mapping: Mapping) -> SubjectReferencer:
    """The protection keyring's subject references when the mapping has one, else the project's HMAC key."""
    if mapping.protection is not None:
        from crmbridge.protection.policy import protector_for

        protector = protector_for(mapping)
        if protector is not None:
            return KeyringReferencer(protector.keyring)
    return HmacReferencer.for_project(audit_dir(mapping) / "subject.key")


def run_details(mapping: Mapping) -> dict[str, Any]:
    """What run_started states: purpose, lawful basis, systems, and per entity the fields with their
    source columns, transforms, data categories and protection (names only) — the lineage of every record."""
    details: dict[str, Any] = {
        "source_systems": {n: c.type for n, c in mapping.sources.items()},
        "target_systems": {n: c.type for n, c in mapping.targets.items()},
        "details": {"entities": {
            e.name: {"source": e.source, "target": e.target, "target_table": e.target_table,
                     "subject_field": getattr(e, "subject", None),
                     "fields": {f.name: {"from": f.source_column, "transforms": [t.name for t in f.transforms],
                                         "personal_data": f.personal_data, "protect": getattr(f, "protect", "none")}
                                for f in e.fields.values()}}
            for e in mapping.entities}},
    }
    categories = {f"{e.name}.{f.name}": f.personal_data for e in mapping.entities for f in e.fields.values()
                  if f.personal_data}
    if categories:
        details["data_categories"] = categories
    if mapping.audit.purpose:
        details["purpose"] = mapping.audit.purpose
    if mapping.audit.lawful_basis:
        details["lawful_basis"] = mapping.audit.lawful_basis
    return details


def open_trail(mapping: Mapping, run_id: str, actor: str) -> AuditTrail:
    return AuditTrail(open_store(mapping), run_id, mapping.name, mapping.sha256, mapping.audit.operator or actor,
                      referencer=referencer_for(mapping), signer=signer_for(mapping),
                      record_level=mapping.audit.record_events, run_details=run_details(mapping))
