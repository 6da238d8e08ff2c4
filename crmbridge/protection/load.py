"""The load step's side of protection: values for the target at the last moment, and before-images that
stay encrypted in staging. Called from `flows.steps._load_batch`."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from crmbridge.protection.mapping_rules import receives_plaintext
from crmbridge.protection.policy import ENCRYPTED, INDEX_POLICY, protector_for


def _protected(entity: Any) -> list[tuple[int, Any]]:
    return [(j, spec) for j, spec in enumerate(entity.fields.values()) if spec.protect in (*ENCRYPTED, INDEX_POLICY)]


def from_staged_columns(mapping: Any, entity: Any, sealed_needed: bool) -> set[str]:
    """The fields whose load values `prepare` makes straight from the staged Arrow columns, so the load need
    not first convert them to Python objects: blind-index tokens always, and encrypted fields a plaintext target
    receives unless the caller needs their sealed values too (a writer in another process decrypts them)."""
    fields = _protected(entity)
    if not fields:
        return set()
    plaintext = not sealed_needed and receives_plaintext(mapping, entity.target)
    return {spec.name for _, spec in fields
            if not getattr(spec, "ref", None) and (spec.protect == INDEX_POLICY or plaintext)}


def prepare(mapping: Any, entity: Any, table: pa.Table, desired: list[list[Any]], existing: dict[str, Any],
            exts: list[str] | None = None) -> None:
    """Turn the staged values in `desired` (one list per field, in `entity.fields` order) into what the target
    receives, in place. Fields `from_staged_columns` names are read from `table`, whatever `desired` holds.
    `exts`: the table's external ids as a list, if the caller has it.

    A plaintext target gets decrypted values; a ciphertext target keeps the envelopes, except that a row whose
    target value already decrypts to the same plaintext keeps the target's envelope, so a rerun finds it
    unchanged instead of rewriting every row with a fresh nonce. Blind-index tokens are truncated to
    `protection.index_bytes` either way."""
    fields = _protected(entity)
    if not fields or table.num_rows == 0:
        return
    protector = protector_for(mapping)
    exts = table.column("_ext").to_pylist() if exts is None else exts
    records: list[bytes] | None = None  # the external ids encoded once, for every field's associated data
    plaintext = receives_plaintext(mapping, entity.target)
    width = 2 * protector.index_bytes
    for j, spec in fields:
        column = desired[j]
        own = not getattr(spec, "ref", None) and spec.name in table.column_names  # the staged text itself
        staged = table.column(spec.name) if own else None
        if spec.protect == INDEX_POLICY:
            desired[j] = (_truncated(staged, width) if staged is not None
                          else [None if v is None else v[:width] for v in column])
            continue
        if plaintext:  # from the staged Arrow column: no list to convert back
            if records is None:
                records = table.column("_ext").cast(pa.binary()).to_pylist()
            desired[j] = protector.decrypt_values(entity.name, spec.name, column if staged is None else staged,
                                                  exts, records)
            continue
        for i, ext in enumerate(exts):
            current = existing.get(ext)
            old = None if current is None else current.values.get(spec.name)
            if old is None or column[i] is None or old == column[i]:
                continue
            try:
                same = (protector.decrypt_value(entity.name, spec.name, old, ext)
                        == protector.decrypt_value(entity.name, spec.name, column[i], ext))
            except Exception:  # the target holds something else (edited, or another keyring): rewrite it
                same = False
            if same:
                column[i] = old


def _truncated(tokens: pa.ChunkedArray, width: int) -> list[str | None]:
    """Blind-index tokens (hex text) cut to `width` characters, as Python strings."""
    if pa.types.is_string(tokens.type) or pa.types.is_large_string(tokens.type):
        return pc.utf8_slice_codeunits(tokens, 0, width).to_pylist()
    return [None if v is None else str(v)[:width] for v in tokens.to_pylist()]


def seal_before_images(mapping: Any, entity: Any, exts: list[str], before_images: list[str | None]) -> None:
    """Before-images of a plaintext target hold its old plaintext; encrypt protected fields in them (bound to
    the row like staged values) so the staging ledger never holds personal data in the clear. In place."""
    import json

    fields = {spec.name: spec for _, spec in _protected(entity) if spec.protect != INDEX_POLICY}
    if not fields or not receives_plaintext(mapping, entity.target):
        return
    protector = protector_for(mapping)
    for i, image in enumerate(before_images):
        if image is None:
            continue
        values = json.loads(image)
        touched = [name for name in values if name in fields and values[name] is not None]
        if not touched:
            continue
        for name in touched:
            values[name] = protector.encrypt_values(entity.name, name, [str(values[name])], [exts[i]])[0]
        before_images[i] = json.dumps(values)
