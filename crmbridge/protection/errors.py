"""Errors of field protection. Messages name keys, entities and fields, never a protected value."""

from __future__ import annotations

from crmbridge.errors import CrmbridgeError


class ProtectionError(CrmbridgeError):
    """Something about keys or ciphertext is wrong."""


class KeyringError(ProtectionError):
    """The keyring cannot be opened, or a key it should hold is missing."""


class UnknownKeyError(ProtectionError):
    """The ciphertext names a key the keyring does not have."""


class RetiredKeyError(ProtectionError):
    """The ciphertext was made with a key that has been retired."""


class ErasedSubjectError(ProtectionError):
    """The data subject's key was destroyed (crypto-shredded)."""


class DecryptionError(ProtectionError):
    """The ciphertext does not authenticate: tampered, truncated, or moved to another field or record."""
