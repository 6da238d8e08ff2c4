"""Deterministic authenticated encryption (AES-SIV, RFC 5297) for fields compared for equality while
encrypted. Equal plaintexts under the same key, entity and field give equal ciphertexts, so the record key
is deliberately not part of the associated data.

Layout: version (0x11) | key id (4) | SIV (16) | ciphertext.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from crmbridge.protection.envelope import HEADER
from crmbridge.protection.errors import DecryptionError

VERSION_SIV = 0x11
OVERHEAD = HEADER.size + 16


def associated(entity: str, field: str) -> list[bytes]:
    return [entity.encode(), field.encode()]


def seal(cipher: AESSIV, key_id: int, plaintext: bytes, ad: list[bytes]) -> bytes:
    head = HEADER.pack(VERSION_SIV, key_id)
    return head + cipher.encrypt(plaintext, [head, *ad])


def open_(cipher: AESSIV, data: bytes, ad: list[bytes]) -> bytes:
    if len(data) < OVERHEAD:
        raise DecryptionError(f"the deterministic envelope is {len(data)} bytes; expected at least {OVERHEAD}")
    head = data[:HEADER.size]
    try:
        return cipher.decrypt(data[HEADER.size:], [head, *ad])
    except InvalidTag:
        raise DecryptionError("the deterministic ciphertext does not authenticate: it was altered, or it "
                              "belongs to another entity or field") from None


def seal_many(cipher: AESSIV, key_id: int, values: Sequence[str | None], ad: list[bytes]) -> list[str | None]:
    head = HEADER.pack(VERSION_SIV, key_id)
    full = [head, *ad]
    encrypt, encode = cipher.encrypt, base64.urlsafe_b64encode
    cache: dict[str, str] = {}  # deterministic: repeated values (cities, countries) are encrypted once
    out: list[str | None] = []
    for value in values:
        if value is None:
            out.append(None)
            continue
        token = cache.get(value)
        if token is None:
            token = cache[value] = encode(head + encrypt(value.encode(), full)).rstrip(b"=").decode()
        out.append(token)
    return out
