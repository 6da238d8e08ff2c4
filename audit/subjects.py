"""Keyed references for data subjects and source keys: HMAC-SHA256, never the value itself.

`SubjectReferencer` is the seam for the field-protection package's blind indexes; until a project wires
those in, the default keys an HMAC with a 32-byte secret kept in the project's state directory (0600) or
given in `CRMBRIDGE_AUDIT_SUBJECT_KEY` (hex). The same key must be used to search, so it is per project.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from crmbridge.errors import CrmbridgeError

KEY_ENV = "CRMBRIDGE_AUDIT_SUBJECT_KEY"


class SubjectReferencer(Protocol):
    def subject_refs(self, values: Iterable[object]) -> list[str | None]:
        """One reference per value (None for a missing value), comparable across runs."""

    def source_refs(self, entity: str, keys: Iterable[object]) -> list[str | None]:
        """References for source keys, scoped to the entity."""


def hmac_sha256_hex(key: bytes) -> Callable[[bytes], str]:
    """HMAC-SHA256 (RFC 2104) with the padded key states computed once: about twice as fast per call as
    `hmac.digest`, which sets up the key again every time (tests check both give the same MAC)."""
    block = key if len(key) <= 64 else hashlib.sha256(key).digest()
    block = block.ljust(64, b"\0")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
    outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def mac(message: bytes) -> str:
        i = inner.copy()
        i.update(message)
        o = outer.copy()
        o.update(i.digest())
        return o.hexdigest()

    return mac


def normalise_subject(value: object) -> str:
    """How a subject value is compared (as the protection package's blind indexes do): NFKC, case folded,
    whitespace collapsed, so a search for `A@x.com ` finds `a@x.com`."""
    return " ".join(unicodedata.normalize("NFKC", str(value)).casefold().split())


class HmacReferencer:
    def __init__(self, key: bytes):
        if len(key) < 16:
            raise CrmbridgeError("the audit subject key must be at least 16 bytes")
        self._key = key

    @classmethod
    def for_project(cls, path: Path) -> HmacReferencer:
        from_env = os.environ.get(KEY_ENV)
        if from_env:
            try:
                return cls(bytes.fromhex(from_env))
            except ValueError:
                raise CrmbridgeError(f"{KEY_ENV} must be hexadecimal") from None
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(secrets.token_hex(32))
            except FileExistsError:  # another run created it a moment ago
                pass
        return cls(bytes.fromhex(path.read_text().strip()))

    def subject_refs(self, values: Iterable[object]) -> list[str | None]:
        mac = hmac_sha256_hex(self._key)
        return [None if v is None or v == "" else mac(b"subject\x00" + normalise_subject(v).encode()) for v in values]

    def source_refs(self, entity: str, keys: Iterable[object]) -> list[str | None]:
        mac = hmac_sha256_hex(self._key)
        prefix = b"source\x00" + entity.encode() + b"\x00"
        return [None if k is None else mac(prefix + str(k).encode()) for k in keys]


class KeyringReferencer:
    """References from the field-protection keyring: a subject reference is the keyring's own
    `subject_reference` (a blind index under the subject-reference key), so audit and protection agree."""

    def __init__(self, keyring: Any):
        from crmbridge.protection import blind_index

        self._subject_key = keyring.subject_key
        self._source_key = blind_index.derive_key(self._subject_key, "audit-source-reference")
        self._tokens = blind_index.tokens

    def subject_refs(self, values: Iterable[object]) -> list[str | None]:
        return self._tokens(self._subject_key, [None if v is None or v == "" else str(v) for v in values])

    def source_refs(self, entity: str, keys: Iterable[object]) -> list[str | None]:
        mac = hmac_sha256_hex(self._source_key)
        prefix = entity.encode() + b"\x00"
        return [None if k is None else mac(prefix + str(k).encode()) for k in keys]
