"""The compliance audit trail: an append-only, hash-chained event store (SQLite or PostgreSQL through
SQLAlchemy) with signed per-run checkpoints, verification, search, reports, retention and the record of
processing. Events hold no personal data: field names, counts, reason codes and keyed-hash references."""

from crmbridge.audit.store import AuditStore
from crmbridge.audit.trail import AuditTrail

__all__ = ["AuditStore", "AuditTrail"]
