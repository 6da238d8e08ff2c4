"""How protected values are shown to people (previews, reports): a field's `mask` policy."""

from __future__ import annotations

from typing import Any

from crmbridge.values import is_missing

HIDDEN = "•••"


def mask_value(value: Any, policy: str) -> str:
    if is_missing(value):
        return ""
    text = str(value)
    if policy == "none":
        return text
    if policy == "last4":
        return HIDDEN + text[-4:] if len(text) > 4 else HIDDEN
    if policy == "email":
        local, at, domain = text.partition("@")
        return f"{local[:1]}{HIDDEN}@{domain}" if at else HIDDEN
    return HIDDEN


def key_mask(entity) -> str:
    """The mask for an entity's source key: the strictest mask of a field that reads a key column."""
    order = ["none", "last4", "email", "full"]
    policies = [f.mask for f in entity.fields.values() if f.source_column in entity.key]
    return max(policies, key=order.index, default="none")
