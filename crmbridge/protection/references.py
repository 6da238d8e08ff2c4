"""References the audit trail stores instead of personal data, keyed by the project's keyring.

`KeyringReferencer` implements `crmbridge.audit.subjects.SubjectReferencer`: a data subject's reference is
the keyed HMAC-SHA256 of the normalised value (the same for every entity and run), a source key's
reference is keyed per entity. Both keys are derived with HKDF from the keyring's index root, so
`crmbridge erase --subject` and an audit search compute the same reference from the same value.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from crmbridge.protection import blind_index
from crmbridge.protection.keyring import Keyring


class KeyringReferencer:
    def __init__(self, keyring: Keyring):
        self.keyring = keyring
        self._source_key = blind_index.derive_key(keyring._index_root, "source-reference")

    def subject_refs(self, values: Iterable[object]) -> list[str | None]:
        return blind_index.tokens(self.keyring.subject_key,
                                  [None if v is None or v == "" else str(v) for v in values])

    def source_refs(self, entity: str, keys: Iterable[object]) -> list[str | None]:
        prefix = entity.encode() + b"\0"
        return [None if k is None else hmac.digest(self._source_key, prefix + str(k).encode(), "sha256").hex()
                for k in keys]
