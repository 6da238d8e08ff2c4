"""Blind indexes: a keyed HMAC-SHA256 of the normalised value, with a key of its own per entity and field.

The per-field keys are derived with HKDF-SHA256 from the keyring's index root (kept apart from the
encryption keys), so a token from one field says nothing about another field's tokens. Equal normalised
values give equal tokens, which is what exact matching and dedup need without decrypting.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TOKEN_BYTES = 32


def normalise(value: str) -> str:
    """What makes two values "the same" for matching: Unicode NFKC, case folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", value).casefold().split())


def derive_key(root: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"crmbridge/{purpose}".encode()).derive(root)


def field_key(root: bytes, entity: str, field: str) -> bytes:
    return derive_key(root, f"blind-index/{entity}\0{field}")


def token(key: bytes, value: str, length: int = TOKEN_BYTES) -> str:
    mac = HMAC(key, hashes.SHA256())
    mac.update(normalise(value).encode())
    return mac.finalize()[:length].hex()


def tokens(key: bytes, values: Sequence[str | None], length: int = TOKEN_BYTES) -> list[str | None]:
    """Tokens of a column (hex); None stays None."""
    return token_column(key, pa.array(values, pa.string()), length).to_pylist() if len(values) else []


def token_column(key: bytes, values: pa.Array, length: int = TOKEN_BYTES) -> pa.Array:
    """Tokens of an Arrow string column as hex text; nulls stay null. One HMAC per value (a copy of the keyed
    state, the cheapest start), the hex text made once for the whole column."""
    data = _normalised(values).cast(pa.binary()).to_pylist()
    copy, empty = HMAC(key, hashes.SHA256()).copy, b""
    macs: list[bytes] = []
    add = macs.append
    for value in data:  # a plain loop: a function call per value would cost a sixth of the HMAC
        one = copy()
        one.update(empty if value is None else value)  # a null row: its slot is masked out below
        add(one.finalize())
    joined = b"".join(macs) if length == TOKEN_BYTES else b"".join(m[:length] for m in macs)
    text = joined.hex().encode()
    offsets = np.arange(len(data) + 1, dtype=np.int64) * (2 * length)
    validity = values.is_valid().buffers()[1] if values.null_count else None
    return pa.LargeStringArray.from_buffers(len(data), pa.py_buffer(offsets), pa.py_buffer(text), validity,
                                            values.null_count).cast(pa.string())


def _normalised(values: pa.Array) -> pa.Array:
    """`normalise` of every value. ASCII values (nearly all emails, phones, ids) are normalised in bulk with
    Arrow kernels, which for ASCII text do exactly what `normalise` does (NFKC is the identity there,
    casefold is lower); other values go through `normalise`."""
    bulk = pc.utf8_trim(pc.replace_substring_regex(pc.utf8_lower(values), _ASCII_SPACE_RUN, " "), " ")
    other = np.flatnonzero(~pc.fill_null(pc.string_is_ascii(values), True).to_numpy(zero_copy_only=False))
    if not len(other):
        return bulk
    out = bulk.to_pylist()
    for i in other.tolist():
        out[i] = normalise(values[i].as_py())
    return pa.array(out, pa.string())


# What `str.split()` treats as whitespace among ASCII characters.
_ASCII_SPACE_RUN = "[" + "".join(f"\\x{ord(c):02x}" for c in map(chr, range(128)) if c.isspace()) + "]+"


def collision_bytes(rows: int, acceptable: float = 1e-6) -> int:
    """The shortest truncation (in bytes) whose chance of any collision among `rows` distinct values stays
    under `acceptable`: by the birthday bound p ≈ n² / 2^(8L+1)."""
    import math

    if rows < 2:
        return 4
    bits = math.log2(rows * rows / (2 * acceptable))
    return max(4, min(TOKEN_BYTES, math.ceil(bits / 8)))
