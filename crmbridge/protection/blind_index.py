"""Blind indexes: a keyed HMAC-SHA256 of the normalised value, with a key of its own per entity and field.

The per-field keys are derived with HKDF-SHA256 from the keyring's index root (kept apart from the
encryption keys), so a token from one field says nothing about another field's tokens. Equal normalised
values give equal tokens, which is what exact matching and dedup need without decrypting.
"""

from __future__ import annotations

import hashlib
import hmac
import unicodedata
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives import hashes
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
    return hmac.new(key, normalise(value).encode(), hashlib.sha256).hexdigest()[: 2 * length]


def tokens(key: bytes, values: Sequence[str | None], length: int = TOKEN_BYTES) -> list[str | None]:
    """Tokens of a column (hex); None stays None.

    ASCII values (nearly all emails, phones, ids) are normalised in bulk with Arrow kernels, which for ASCII
    text do exactly what `normalise` does (NFKC is the identity there, casefold is lower); other values go
    through `normalise`."""
    if not values:
        return []
    column = pa.array(values, pa.string())
    ascii_only = pc.string_is_ascii(column).to_numpy(zero_copy_only=False)
    bulk = pc.utf8_trim(pc.replace_substring_regex(pc.utf8_lower(column), _ASCII_SPACE_RUN, " "), " ").to_pylist()
    base, width = hmac.new(key, digestmod=hashlib.sha256), 2 * length  # copying the keyed state is cheapest
    out: list[str | None] = []
    for value, normalised, simple in zip(values, bulk, ascii_only, strict=True):
        if value is None:
            out.append(None)
            continue
        mac = base.copy()
        mac.update((normalised if simple else normalise(value)).encode())
        out.append(mac.hexdigest()[:width])
    return out


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
