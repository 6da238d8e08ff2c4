"""Looking before running: live checks of sources and targets, and previews of cleansing."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from crmbridge.connectors import connector_for
from crmbridge.errors import CrmbridgeError
from crmbridge.flows.steps import check_source_schema
from crmbridge.mappings.cleanse import cleanse
from crmbridge.mappings.envvars import Redactor
from crmbridge.mappings.model import Entity, Mapping
from crmbridge.masking import mask_value


def check_systems(mapping: Mapping) -> list[str]:
    """Connect to every source and target: schema drift, missing tables and columns. Returns problems."""
    redact = Redactor(mapping.secrets)
    problems: list[str] = []
    targets = {}
    for entity in mapping.load_order():
        connector = connector_for(mapping.sources[entity.source], mapping)
        try:
            source = connector.open_source(entity)
            try:
                check_source_schema(mapping, entity, source, connector.describe())
            finally:
                source.close()
        except CrmbridgeError as error:
            problems.append(redact(str(error)))
        try:
            if entity.target not in targets:
                targets[entity.target] = connector_for(mapping.targets[entity.target], mapping).open_target()
            targets[entity.target].prepare(entity, dry_run=True)
        except CrmbridgeError as error:
            problems.append(redact(str(error)))
    for target in targets.values():
        target.close()
    return problems


@dataclass
class EntityPreview:
    entity: Entity
    before: pd.DataFrame  # source columns (masked), with `row` first
    after: pd.DataFrame  # target fields (masked), with `row` first
    quarantined: dict[int, str]  # row -> reasons
    rejected: dict[int, str]  # unreadable rows -> reason


def preview_entity(mapping: Mapping, entity: Entity, limit: int) -> EntityPreview:
    connector = connector_for(mapping.sources[entity.source], mapping)
    source = connector.open_source(entity)
    try:
        check_source_schema(mapping, entity, source, connector.describe())
        batch = next(iter(source.read(entity.source_columns, limit)), None)
    finally:
        source.close()
    if batch is None:
        empty = pd.DataFrame()
        return EntityPreview(entity, empty, empty, {}, {})
    masks = {spec.source_column: spec.mask for spec in entity.fields.values() if spec.source_column}
    before = pd.DataFrame({"row": batch.row_numbers})
    for column in entity.source_columns:
        before[column] = [mask_value(v, masks.get(column, "none")) for v in batch.frame[column]]
    cleansed = cleanse(mapping, entity, batch.frame, batch.row_numbers)
    after = pd.DataFrame({"row": cleansed.frame["_row"]})
    for name, spec in entity.fields.items():
        after[name] = [mask_value(v, spec.mask) for v in cleansed.frame[name]]
    quarantined = {row: "; ".join(f"{p.field}: {p.code}" for p in problems)
                   for row, problems in cleansed.quarantined.items()}
    rejected = {r.row_number: f"{r.reason}: {r.detail}" for r in batch.rejected}
    return EntityPreview(entity, before, after, quarantined, rejected)
