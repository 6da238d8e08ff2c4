"""Field protection: envelopes (AES-256-GCM), deterministic encryption (AES-SIV), blind indexes
(HMAC-SHA256 with HKDF-derived per-field keys), a sealed keyring and per-data-subject keys."""

from __future__ import annotations

from typing import Any

from crmbridge.protection.errors import (
    DecryptionError,
    ErasedSubjectError,
    KeyringError,
    ProtectionError,
    RetiredKeyError,
    UnknownKeyError,
)
from crmbridge.protection.keyring import Keyring, open_keyring
from crmbridge.protection.policy import POLICIES, Protector, protector_for
from crmbridge.protection.references import KeyringReferencer

__all__ = [
    "POLICIES",
    "DecryptionError",
    "ErasedSubjectError",
    "Keyring",
    "KeyringError",
    "KeyringReferencer",
    "ProtectionError",
    "Protector",
    "RetiredKeyError",
    "UnknownKeyError",
    "open_keyring",
    "protector_for",
    "subject_reference",
]


def subject_reference(mapping_or_keyring: Any, value: str) -> str:
    """The audit trail's reference to a data subject: a keyed HMAC-SHA256 (hex) of the normalised value.

    The same person gives the same reference in every run and entity; without the keyring it cannot be
    turned back into the value or recomputed from a guess. Accepts a Keyring, a Protector or a Mapping with
    a `protection` section."""
    if isinstance(mapping_or_keyring, Keyring):
        ring = mapping_or_keyring
    elif isinstance(mapping_or_keyring, Protector):
        ring = mapping_or_keyring.keyring
    else:
        protector = protector_for(mapping_or_keyring)
        if protector is None:
            raise ProtectionError("the mapping has no `protection` section, so it has no keyring to make "
                                  "subject references with")
        ring = protector.keyring
    return ring.subject_reference(value)
