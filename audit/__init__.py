"""The compliance audit trail. For now an append-only JSON Lines file per run, holding no personal data:
actions, counts, entity and field names, never values."""

from crmbridge.audit.trail import AuditTrail

__all__ = ["AuditTrail"]
