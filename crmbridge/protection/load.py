"""The load step's side of protection: values for the target at the last moment, and before-images that
stay encrypted in staging. Called from `flows.steps._load_batch`."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from crmbridge.protection.mapping_rules import receives_plaintext
from crmbridge.protection.policy import ENCRYPTED, INDEX_POLICY, protector_for


def _protected(entity: Any) -> list[tuple[int, Any]]:
    return [(j, spec) for j, spec in enumerate(entity.fields.values()) if spec.protect in (*ENCRYPTED, INDEX_POLICY)]


def prepare(mapping: Any, entity: Any, table: pa.Table, desired: list[list[Any]], existing: dict[str, Any]) -> None:
    """Turn the staged values in `desired` (one list per field, in `entity.fields` order) into what the target
    receives, in place.

    A plaintext target gets decrypted values; a ciphertext target keeps the envelopes, except that a row whose
    target value already decrypts to the same plaintext keeps the target's envelope, so a rerun finds it
    unchanged instead of rewriting every row with a fresh nonce. Blind-index tokens are truncated to
    `protection.index_bytes` either way."""
    fields = _protected(entity)
    if not fields or table.num_rows == 0:
        return
    protector = protector_for(mapping)
    exts: list[str] = table.column("_ext").to_pylist()
    plaintext = receives_plaintext(mapping, entity.target)
    width = 2 * protector.index_bytes
    for j, spec in fields:
        column = desired[j]
        if spec.protect == INDEX_POLICY:
            desired[j] = [None if v is None else v[:width] for v in column]
            continue
        if plaintext:  # from the staged Arrow column where it is the same text: no list to convert back
            same = not getattr(spec, "ref", None) and spec.name in table.column_names
            staged = table.column(spec.name) if same else column
            desired[j] = protector.decrypt_values(entity.name, spec.name, staged, exts)
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
