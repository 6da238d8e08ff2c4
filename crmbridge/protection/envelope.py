"""AES-256-GCM envelopes: probabilistic authenticated encryption of one field value.

Layout (33 bytes of overhead): version (1) | key id (4, big-endian) | nonce (12) | ciphertext | tag (16).
The associated data binds the ciphertext to its entity, field and record key, so a value copied into
another field or row fails to decrypt. Values are stored as unpadded URL-safe base64 text, since staging
and most targets hold them in text columns.

Columns go through `seal_column` / `decode_column`: one AESGCM call per value (each value has its own nonce
and associated data), everything else (nonces, base64, the Arrow result) done once for the whole column.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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


_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


def nonces(count: int) -> list[bytes]:
    """`count` fresh random nonces from one os.urandom call."""
    return np.frombuffer(os.urandom(NONCE * count), dtype=f"V{NONCE}").tolist()


def seal_column(cipher: AESGCM, key_id: int, values: pa.Array, prefix: bytes, records: Sequence[bytes],
                version: int = VERSION_GCM) -> pa.Array:
    """Encrypt an Arrow string column into envelope text; nulls stay null. Row i's associated data is
    `prefix + records[i]` (see `aad`), after the envelope header as in `seal`."""
    head = HEADER.pack(version, key_id)
    bound = head + prefix
    encrypt, text = cipher.encrypt, binascii.b2a_base64
    plain = values.cast(pa.binary()).to_pylist()
    fresh = nonces(len(plain))
    if values.null_count:
        pieces = [b"" if p is None else text(head + n + encrypt(n, p, bound + r))
                  for p, n, r in zip(plain, fresh, records, strict=True)]
    else:
        pieces = [text(head + n + encrypt(n, p, bound + r)) for p, n, r in zip(plain, fresh, records, strict=True)]
    # Each piece is padded standard base64 and a newline: dropping both and translating the alphabet once for
    # the whole column gives the envelopes' unpadded URL-safe text, back to back.
    joined = b"".join(pieces).translate(_TO_URLSAFE, b"=\n")
    sizes = pc.fill_null(pc.binary_length(values), -OVERHEAD).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum((4 * (sizes + OVERHEAD) + 2) // 3, out=offsets[1:])
    if offsets[-1] != len(joined):  # cannot happen unless the base64 layout changes; never emit misaligned text
        raise AssertionError("envelope text does not line up with the values")
    validity = values.is_valid().buffers()[1] if values.null_count else None
    return pa.LargeStringArray.from_buffers(len(values), pa.py_buffer(offsets), pa.py_buffer(joined), validity,
                                            values.null_count).cast(pa.string())


def decode_column(tokens: pa.Array) -> tuple[bytes, np.ndarray, np.ndarray] | None:
    """The envelopes of an Arrow string column decoded from base64 in one call: (bytes, start, end) with
    row i at bytes[start[i]:end[i]] (empty for nulls). None if any text is not plain unpadded URL-safe
    base64; the caller then decodes value by value, which reports the precise problem."""
    sizes = pc.fill_null(pc.binary_length(tokens), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if (sizes % 4 == 1).any():
        return None
    # Complete every value's last base64 quantum with "A" (zero bits), so one decode covers the column.
    padded = pc.binary_join_element_wise(tokens, pc.take(_QUANTUM_FILL, pa.array(sizes % 4)), "")
    padded = padded.cast(pa.large_string())
    bounds = np.frombuffer(padded.buffers()[1], np.int64)[padded.offset:padded.offset + len(padded) + 1]
    if (np.diff(bounds) % 4).any():
        return None
    text = padded.buffers()[2]
    raw = b"" if text is None else text.to_pybytes()[bounds[0]:bounds[-1]]
    if b"=" in raw:  # padded text decodes value by value
        return None
    try:
        # Not strict mode (a quarter slower): it skips characters outside the alphabet, which the length check
        # below notices, as it would any text the strict decoder refuses here.
        decoded = binascii.a2b_base64(raw.translate(_FROM_URLSAFE))
    except binascii.Error:
        return None
    if len(decoded) != len(raw) // 4 * 3:
        return None
    start = (bounds[:-1] - bounds[0]) // 4 * 3
    return decoded, start, start + sizes * 3 // 4


_QUANTUM_FILL = pa.array(["", "AAA", "AA", "A"])  # by length % 4; 1 cannot occur in base64
