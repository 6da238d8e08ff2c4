"""The rows already in an entity's target table, read through the target connector's own reader, for
`dedupe.match_target`."""

from __future__ import annotations

import dataclasses

import pandas as pd

from crmbridge.errors import CrmbridgeError, SourceError
from crmbridge.mappings.model import Entity, FieldSpec, Mapping

_NOT_THERE_YET = ("has no table", "the database file does not exist")


def read_target_rows(mapping: Mapping, entity: Entity) -> pd.DataFrame:
    """`_ext` (the external id) plus every field the matcher uses, for target rows that have an external id;
    empty when the target table does not exist yet (a first run that creates it)."""
    from crmbridge.connectors import connector_for

    spec = entity.dedupe
    assert spec is not None
    connector = connector_for(mapping.targets[entity.target], mapping)
    if not hasattr(connector, "open_source"):
        raise CrmbridgeError(f"entity `{entity.name}`: `dedupe.match_target` needs a target that can be read; "
                             f"`{entity.target}` ({mapping.targets[entity.target].type}) cannot")
    used = _used_fields(entity)
    ext = entity.external_id_column
    reader_entity = dataclasses.replace(
        entity, source=entity.target, table=entity.target_table, query=None, key=(ext,), columns={},
        fields={name: FieldSpec(name, name) for name in used}, dedupe=None)
    try:
        source = connector.open_source(reader_entity)
        try:
            frames = [batch.frame for batch in source.read([ext, *used], mapping.batch_size)]
        finally:
            source.close()
    except SourceError as error:
        # A first run creates the target (file or table) only after dedupe: nothing there to match yet.
        if any(phrase in str(error) for phrase in _NOT_THERE_YET):
            return pd.DataFrame(columns=["_ext", *used])
        raise
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[ext, *used])
    frame = frame.rename(columns={ext: "_ext"})
    frame = frame[frame["_ext"].notna()].reset_index(drop=True)
    for name in used:  # the staged types, so keys and comparisons see the same text on both sides
        kind = entity.fields[name].type if name in entity.fields else "string"
        if kind in ("date", "timestamp"):
            frame[name] = pd.to_datetime(frame[name], errors="coerce", utc=kind == "timestamp")
    return frame


def _used_fields(entity: Entity) -> list[str]:
    from crmbridge.dedupe.keys import parse

    spec = entity.dedupe
    assert spec is not None
    names = [c.field for c in spec.compare] + [n for rule in spec.rules for n in rule]
    names += [parse(k)[1] for rule in spec.blocking for k in rule]
    return list(dict.fromkeys(names))
