"""AES-256-GCM envelopes: probabilistic authenticated encryption of one field value.

Layout (33 bytes of overhead): version (1) | key id (4, big-endian) | nonce (12) | ciphertext | tag (16).
The associated data binds the ciphertext to its entity, field and record key, so a value copied into
another field or row fails to decrypt. Values are stored as unpadded URL-safe base64 text, since staging
and most targets hold them in text columns.
"""

from __future__ import annotations

import base64
import os
import struct
from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crmbridge.protection.errors import DecryptionError

VERSION_GCM = 0x01  # data key from the keyring
VERSION_GCM_SUBJECT = 0x02  # per-data-subject key (crypto-shredding); the key id is the subject key's id
HEADER = struct.Struct(">BI")
NONCE = 12
TAG = 16
OVERHEAD = HEADER.size + NONCE + TAG


def aad(entity: str, field: str, record: str) -> bytes:
    # NUL separators: names cannot contain NUL, so (a, bc) and (ab, c) never give the same bytes.
    return f"{entity}\0{field}\0{record}".encode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as error:
        raise DecryptionError("the value is not a crmbridge envelope (not base64 text)") from error


def header(data: bytes) -> tuple[int, int]:
    """(version, key id) of an envelope."""
    if len(data) < OVERHEAD:
        raise DecryptionError(f"the envelope is {len(data)} bytes; expected at least {OVERHEAD}")
    return HEADER.unpack_from(data)


def seal(cipher: AESGCM, key_id: int, plaintext: bytes, associated: bytes, nonce: bytes | None = None,
         version: int = VERSION_GCM) -> bytes:
    head = HEADER.pack(version, key_id)
    nonce = os.urandom(NONCE) if nonce is None else nonce
    return head + nonce + cipher.encrypt(nonce, plaintext, head + associated)


def open_(cipher: AESGCM, data: bytes, associated: bytes) -> bytes:
    head, nonce, body = data[:HEADER.size], data[HEADER.size:HEADER.size + NONCE], data[HEADER.size + NONCE:]
    try:
        return cipher.decrypt(nonce, body, head + associated)
    except InvalidTag:
        raise DecryptionError("the ciphertext does not authenticate: it was altered, or it belongs to "
                              "another entity, field or record") from None


def seal_many(cipher: AESGCM, key_id: int, values: Sequence[str | None],
              associated: Callable[[int], bytes]) -> list[str | None]:
    """Encrypt a column: one AESGCM object, one os.urandom call for every nonce; None stays None."""
    head = HEADER.pack(VERSION_GCM, key_id)
    nonces = os.urandom(NONCE * len(values))
    encrypt, encode = cipher.encrypt, base64.urlsafe_b64encode
    out: list[str | None] = []
    append = out.append
    for i, value in enumerate(values):
        if value is None:
            append(None)
            continue
        nonce = nonces[i * NONCE:(i + 1) * NONCE]
        append(encode(head + nonce + encrypt(nonce, value.encode(), head + associated(i))).rstrip(b"=").decode())
    return out
