"""Field policies applied to whole columns: before staging (`protect_frame`) and at the last moment before a
target write (`for_target`).

  encrypt        AES-256-GCM envelope bound to (entity, field, external id); per-subject key if the entity
                 names a `subject` field
  deterministic  AES-SIV envelope bound to (entity, field): equal values, equal ciphertexts
  blind_index    encrypted like `encrypt`, plus a `<field>_bidx` column holding the HMAC token of the
                 normalised value (full length in staging, truncated to `protection.index_bytes` in targets)
  hash           the value replaced by its keyed HMAC token (irreversible)
  drop           the value never leaves extraction (the field is null in staging and in the target)
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.exceptions import InvalidTag

from crmbridge.protection import blind_index, envelope, siv
from crmbridge.protection.errors import DecryptionError, ProtectionError
from crmbridge.protection.keyring import Keyring, open_keyring
from crmbridge.protection.subject_keys import SubjectKeys

POLICIES = ("none", "encrypt", "deterministic", "blind_index", "hash", "drop")
ENCRYPTED = ("encrypt", "deterministic", "blind_index")
INDEX_SUFFIX = "_bidx"
INDEX_POLICY = "index"  # the policy of the generated `<field>_bidx` field


def _plain(series: pd.Series) -> list[str | None]:
    missing = series.isna().to_numpy()  # NaN, None and pd.NA alike
    return [None if gone else str(v) for v, gone in zip(series.tolist(), missing, strict=True)]


def _text(series: pd.Series) -> pa.Array:
    """A frame column as an Arrow string array (missing values null, anything else as its text); Arrow-backed
    string columns, what cleansing produces, without a Python object per value."""
    if isinstance(series.dtype, pd.StringDtype) and series.dtype.storage == "pyarrow":
        column = pa.array(series.array)
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        return column.cast(pa.string())
    return pa.array(_plain(series), pa.string())


def _text_of(values: Sequence[str | None] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values.cast(pa.string())
    return pa.array(values, pa.string(), from_pandas=True)  # NaN counts as missing, as in pandas


def _column(values: list[Any] | pa.Array, like: pd.Series) -> pd.Series:
    if isinstance(values, pa.Array):
        return pd.Series(values, index=like.index, dtype=like.dtype if isinstance(like.dtype, pd.StringDtype)
                         else object)
    return pd.Series(values, index=like.index, dtype=like.dtype if like.dtype != object else object)


class Protector:
    """Keys plus the rules to apply them to a column. One per run (cached per mapping and keyring file)."""

    def __init__(self, keyring: Keyring, subjects: SubjectKeys | None = None, index_bytes: int = 32):
        self.keyring, self.subjects, self.index_bytes = keyring, subjects, index_bytes
        self._lock = threading.Lock()  # batches may be staged from Prefect worker threads

    # --- before staging ----------------------------------------------------------------------------

    def protect_frame(self, entity: Any, frame: pd.DataFrame) -> pd.DataFrame:
        fields = [f for f in entity.fields.values() if getattr(f, "protect", "none") != "none"]
        if not fields or frame.empty:
            return frame
        out = frame.copy(deep=False)  # columns are replaced, never changed in place
        records = _text(frame["_ext"]).cast(pa.binary()).to_pylist()  # each row's key, for associated data
        subject_ids: list[int | None] | None = None
        subject = getattr(entity, "subject", None)
        if subject and self.subjects is not None and any(f.protect in ("encrypt", "blind_index") for f in fields):
            subject_ids = self._subject_ids(_plain(frame[subject]))
        for spec in fields:
            if spec.protect == INDEX_POLICY:
                continue  # filled from the field it indexes
            like = frame[spec.name]
            if spec.protect == "drop":
                out[spec.name] = _column([None] * len(like), like)
                continue
            values = _text(like)
            if spec.protect in ("blind_index", "hash"):
                tokens = blind_index.token_column(self.keyring.index_key(entity.name, spec.name), values)
                out[spec.name if spec.protect == "hash" else spec.name + INDEX_SUFFIX] = _column(tokens, like)
                if spec.protect == "hash":
                    continue
            if spec.protect == "deterministic":
                key = self.keyring.current("siv")
                sealed: list[str | None] | pa.Array = siv.seal_many(
                    self.keyring.siv(key.id), key.id, values.to_pylist(), siv.associated(entity.name, spec.name))
            else:
                sealed = self._encrypt_column(entity.name, spec.name, values, records, subject_ids)
            out[spec.name] = _column(sealed, like)
        return out

    def _subject_ids(self, subjects: list[str | None]) -> list[int | None]:
        refs = [None if s is None else self.keyring.subject_reference(s) for s in subjects]
        with self._lock:
            found = self.subjects.ensure(r for r in refs if r is not None)
        return [None if r is None else found[r][0] for r in refs]

    def encrypt_values(self, entity: str, field: str, values: Sequence[str | None], exts: Sequence[str],
                       subject_ids: Sequence[int | None] | None = None) -> list[str | None]:
        """Encrypt a column under the current data key, or per row under the subject's key where known."""
        records = [ext.encode() for ext in exts]
        return self._encrypt_column(entity, field, _text_of(values), records, subject_ids).to_pylist()

    def _encrypt_column(self, entity: str, field: str, values: pa.Array, records: Sequence[bytes],
                        subject_ids: Sequence[int | None] | None = None) -> pa.Array:
        prefix = envelope.aad(entity, field, "")
        key = self.keyring.current("data")
        if subject_ids is None or all(s is None for s in subject_ids):
            return envelope.seal_column(self.keyring.gcm(key.id), key.id, values, prefix, records)
        data_cipher = self.keyring.gcm(key.id)
        out: list[str | None] = []
        for value, record, subject_id in zip(values.to_pylist(), records, subject_ids, strict=True):
            if value is None:
                out.append(None)
            elif subject_id is None:
                out.append(envelope.b64(envelope.seal(data_cipher, key.id, value.encode(), prefix + record)))
            else:
                out.append(envelope.b64(envelope.seal(self.subjects.cipher(subject_id), subject_id, value.encode(),
                                                      prefix + record, version=envelope.VERSION_GCM_SUBJECT)))
        return pa.array(out, pa.string())

    # --- reading back ------------------------------------------------------------------------------

    def decrypt_value(self, entity: str, field: str, token: str, ext: str | None = None) -> str:
        data = envelope.unb64(token)
        if len(data) < envelope.HEADER.size:
            raise DecryptionError(f"{entity}.{field}: the value is {len(data)} bytes, too short for an envelope")
        version, key_id = envelope.HEADER.unpack_from(data)
        if version == siv.VERSION_SIV:
            return siv.open_(self.keyring.siv(key_id), data, siv.associated(entity, field)).decode()
        if version in (envelope.VERSION_GCM, envelope.VERSION_GCM_SUBJECT):
            envelope.header(data)  # length check before any key lookup
            if ext is None:
                raise ProtectionError(f"{entity}.{field}: decrypting needs the record's external id")
            if version == envelope.VERSION_GCM:
                cipher = self.keyring.gcm(key_id)
            elif self.subjects is None:
                raise ProtectionError(f"{entity}.{field}: the value is under a data-subject key, but no "
                                      "subject key store is configured")
            else:
                cipher = self.subjects.cipher(key_id)
            return envelope.open_(cipher, data, envelope.aad(entity, field, ext)).decode()
        raise DecryptionError(f"{entity}.{field}: the value is not a crmbridge envelope (unknown format "
                              f"{version})")

    def decrypt_values(self, entity: str, field: str, tokens: Sequence[str | None] | pa.Array | pa.ChunkedArray,
                       exts: Sequence[str], records: Sequence[bytes] | None = None) -> list[str | None]:
        """Decrypt a column (a list or Arrow strings); None/NaN stay None. AES-GCM envelopes are decoded for
        the whole column at once; anything else, or any value that fails, goes value by value, which gives
        the precise error. `records`: the external ids UTF-8 encoded, if the caller has them (it decrypts
        several fields of the same rows)."""
        try:
            column = _text_of(tokens)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            column = None
        found = None if column is None else self._decrypt_column(entity, field, column, exts, records)
        if found is not None:
            return found
        listed = tokens.to_pylist() if isinstance(tokens, (pa.Array, pa.ChunkedArray)) else list(tokens)
        return self._decrypt_each(entity, field, listed, exts)

    def _decrypt_column(self, entity: str, field: str, column: pa.Array, exts: Sequence[str],
                        records: Sequence[bytes] | None = None) -> list[str | None] | None:
        """The fast path of `decrypt_values`, or None where it does not apply (SIV, malformed text or envelopes,
        a value that does not authenticate)."""
        decoded = envelope.decode_column(column)
        if decoded is None:
            return None
        data, start, end = decoded
        rows = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
        out: list[str | None] = [None] * len(column)
        if not len(rows):
            return out
        if ((end - start)[rows] < envelope.OVERHEAD).any():
            return None
        raw = np.frombuffer(data, np.uint8)
        heads = np.ascontiguousarray(raw[start[rows, None] + np.arange(envelope.HEADER.size)])
        if (heads == heads[0]).all():  # the usual case: one format and key for the whole column
            groups = [(heads[0].tobytes(), rows)]
        else:
            kinds, which = np.unique(heads.view(f"V{envelope.HEADER.size}").ravel(), return_inverse=True)
            groups = [(head, rows[which == kind]) for kind, head in enumerate(kinds.tolist())]
        for head, members in groups:
            first = int(members[0])  # checks the key (known, not retired) and the format with a precise error
            self.decrypt_value(entity, field, column[first].as_py(), exts[first])
            plain = self._open_rows(entity, field, head, (data, start, end), members, exts, records)
            if plain is None:
                return None
            if len(members) == len(out):
                return plain
            for i, value in zip(members.tolist(), plain, strict=True):
                out[i] = value
        return out

    def _open_rows(self, entity: str, field: str, head: bytes, decoded: tuple[bytes, np.ndarray, np.ndarray],
                   rows: np.ndarray, exts: Sequence[str], records: Sequence[bytes] | None = None,
                   ) -> list[str | None] | None:
        """The plaintexts of the given rows, which all have envelope header `head`; None if one does not
        authenticate or is not an AES-GCM envelope."""
        version, key_id = envelope.HEADER.unpack(head)
        if version not in (envelope.VERSION_GCM, envelope.VERSION_GCM_SUBJECT):
            return None
        data, start, end = decoded
        at = envelope.HEADER.size
        nonces = np.ascontiguousarray(np.frombuffer(data, np.uint8)[start[rows, None] + at + np.arange(envelope.NONCE)])
        bodies = _slices(data, start[rows] + at + envelope.NONCE, end[rows])
        bound = head + envelope.aad(entity, field, "")
        if records is None:
            picked = exts if len(rows) == len(exts) else [exts[i] for i in rows.tolist()]
            records = [ext.encode() for ext in picked]
        elif len(rows) != len(records):
            records = [records[i] for i in rows.tolist()]
        associated = [bound + record for record in records]
        try:
            return [value.decode() for value in map(self._cipher(version, key_id).decrypt,
                                                    nonces.view(f"V{envelope.NONCE}").ravel().tolist(), bodies,
                                                    associated)]
        except (InvalidTag, ValueError):
            return None

    def _decrypt_each(self, entity: str, field: str, tokens: Sequence[str | None],
                      exts: Sequence[str]) -> list[str | None]:
        """Decrypt value by value. The first value under each (format, key) goes through `decrypt_value`, which
        checks the key and the format; the rest reuse its cipher. None/NaN stay None."""
        prefix = envelope.aad(entity, field, "")
        siv_ad = siv.associated(entity, field)
        decode = base64.urlsafe_b64decode
        ciphers: dict[bytes, Any] = {}
        size, start = envelope.HEADER.size, envelope.HEADER.size + envelope.NONCE
        out: list[str | None] = []
        append = out.append
        for i, token in enumerate(tokens):
            if token is None or token != token:
                append(None)
                continue
            try:
                data = decode(token + "=" * (-len(token) % 4))
            except (ValueError, TypeError):
                data = b""
            head = data[:size]  # version + key id
            found = ciphers.get(head)
            if found is None:
                append(self.decrypt_value(entity, field, token, exts[i]))  # validates format, key and status
                ciphers[head] = (data[0], self._cipher(*envelope.HEADER.unpack_from(data)))
                continue
            version, cipher = found
            try:
                if version == siv.VERSION_SIV:
                    append(cipher.decrypt(data[size:], [data[:size], *siv_ad]).decode())
                elif len(data) < envelope.OVERHEAD:
                    raise DecryptionError(f"{entity}.{field}: an envelope is {len(data)} bytes; expected at least "
                                          f"{envelope.OVERHEAD}")
                else:
                    append(cipher.decrypt(data[size:start], data[start:], data[:size] + prefix + exts[i].encode())
                           .decode())
            except (InvalidTag, ValueError, DecryptionError):
                append(self.decrypt_value(entity, field, token, exts[i]))  # raises the precise error
        return out

    def _cipher(self, version: int, key_id: int) -> Any:
        if version == siv.VERSION_SIV:
            return self.keyring.siv(key_id)
        if version == envelope.VERSION_GCM:
            return self.keyring.gcm(key_id)
        return self.subjects.cipher(key_id)

    def for_target(self, entity: Any, table: pa.Table, plaintext: bool) -> pa.Table:
        """The staged Arrow rows as the target receives them: decrypted if it takes plaintext, blind-index
        tokens truncated to `index_bytes` either way."""
        exts: list[str] | None = None
        for spec in entity.fields.values():
            policy = getattr(spec, "protect", "none")
            if policy in ENCRYPTED and plaintext:
                exts = exts if exts is not None else table.column("_ext").to_pylist()
                values = self.decrypt_values(entity.name, spec.name, table.column(spec.name), exts)
            elif policy == INDEX_POLICY and self.index_bytes < blind_index.TOKEN_BYTES:
                values = pc.utf8_slice_codeunits(table.column(spec.name), 0, 2 * self.index_bytes)
            else:
                continue
            at = table.schema.get_field_index(spec.name)
            table = table.set_column(at, spec.name, pa.array(values, pa.string())
                                     if isinstance(values, list) else values)
        return table


def _slices(data: bytes, first: np.ndarray, last: np.ndarray) -> list[bytes]:
    """`data[first[i]:last[i]]` for every i, ranges ascending and apart, as Arrow makes them (each range an
    element of one binary array, every gap the element between, then every other element taken): less than
    half the cost of slicing in Python."""
    if not len(first):
        return []
    bounds = np.empty(2 * len(first), np.int64)
    bounds[0::2], bounds[1::2] = first, last
    if bounds[0] < 0 or bounds[-1] > len(data) or (np.diff(bounds) < 0).any():  # Arrow would not check them
        raise ValueError("slices out of order or outside the data")
    both = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(bounds) - 1,
                                            [None, pa.py_buffer(bounds), pa.py_buffer(data)])
    return both.take(pa.array(np.arange(0, len(bounds), 2))).to_pylist()


# --- one protector per mapping ---------------------------------------------------------------------------

_CACHE: dict[tuple[Any, ...], Protector] = {}
_CACHE_LOCK = threading.Lock()


def protector_for(mapping: Any) -> Protector | None:
    """The run's protector, or None when the mapping protects no field. Opened once per keyring version."""
    settings = getattr(mapping, "protection", None)
    if settings is None:
        return None
    path = Path(settings.keyring)
    try:
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        stamp = None
    key = (str(path), stamp, settings.master_key_env, str(settings.subjects), settings.index_bytes)
    with _CACHE_LOCK:
        found = _CACHE.get(key)
        if found is None:
            ring = open_keyring(path, settings.master_key_env)
            subjects = SubjectKeys(ring, settings.subjects) if settings.subjects else None
            found = _CACHE[key] = Protector(ring, subjects, settings.index_bytes)
        return found


def forget_protectors() -> None:
    """Drop cached protectors (and the subject keys they hold in memory): after an erasure in this process."""
    with _CACHE_LOCK:
        for protector in _CACHE.values():
            if protector.subjects is not None:
                protector.subjects.close()
        _CACHE.clear()
