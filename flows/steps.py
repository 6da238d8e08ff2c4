"""The stages of one entity's migration as plain functions; `flows.migrate` runs them as Prefect tasks.

extract -> cleanse -> validate -> protect -> stage -> dedupe -> load -> reconcile
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pandas as pd

from crmbridge.audit import AuditTrail
from crmbridge.connectors import connector_for
from crmbridge.connectors.base import Connector, Source, SourceBatch, Target
from crmbridge.errors import SchemaDriftError
from crmbridge.flows.progress import NoProgress, Progress
from crmbridge.flows.reconcile import EntityReconciliation, reconcile_entity
from crmbridge.mappings.cleanse import cleanse
from crmbridge.mappings.model import Entity, Mapping
from crmbridge.runs import RunDir
from crmbridge.staging import QuarantineRecord, Staging
from crmbridge.values import canonical

log = logging.getLogger("crmbridge.run")


@dataclass
class RunContext:
    mapping: Mapping
    run: RunDir
    staging: Staging
    audit: AuditTrail
    dry_run: bool = False
    progress: Progress = field(default_factory=NoProgress)
    _targets: dict[str, Target] = field(default_factory=dict)

    def connector(self, name: str, role: str) -> Connector:
        systems = self.mapping.sources if role == "source" else self.mapping.targets
        return connector_for(systems[name], self.mapping)

    def open_source(self, entity: Entity) -> Source:
        return self.connector(entity.source, "source").open_source(entity)

    def target(self, name: str) -> Target:
        if name not in self._targets:
            self._targets[name] = self.connector(name, "target").open_target()
        return self._targets[name]

    def close(self) -> None:
        for target in self._targets.values():
            target.close()
        self._targets.clear()


# --- extract: schema drift ------------------------------------------------------------------------------

_COMPATIBLE = {
    "string": {"string"}, "integer": {"integer"}, "decimal": {"decimal", "integer", "float"},
    "float": {"float", "decimal", "integer"}, "boolean": {"boolean", "integer"}, "date": {"date", "timestamp"},
    "timestamp": {"timestamp"},
}


def check_source_schema(mapping: Mapping, entity: Entity, source: Source, where: str) -> None:
    """Compare the source's real columns with what the mapping expects; fail before reading a row."""
    actual = source.columns()
    if actual is None:
        return
    found = {c.name: c for c in actual}
    problems = []
    for column in entity.source_columns:
        if column not in found:
            problems.append(f"column `{column}` is missing (the mapping reads it)")
    for name, spec in entity.columns.items():
        info = found.get(name)
        if info is None:
            if name not in entity.source_columns:
                problems.append(f"declared column `{name}` is missing")
            continue
        if info.type != "unknown" and info.type not in _COMPATIBLE[spec.type]:
            problems.append(f"column `{name}` is {info.native or info.type} ({info.type}); "
                            f"the mapping expects {spec.type}")
    for column in entity.source_columns:
        info = found.get(column)
        if (info and info.type == "timestamp" and info.timezone_aware is not True
                and not mapping.timezone_for(entity, column)):
            problems.append(f"column `{column}` holds naive timestamps ({info.native}); declare its time zone "
                            "(`timezone` on the column, the source, or in settings)")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise SchemaDriftError(f"entity `{entity.name}`: source `{entity.source}` ({where}) does not match the "
                               f"mapping:\n{listing}\nfound columns: {', '.join(found)}")


# --- cleanse, validate, protect, stage -------------------------------------------------------------------


def protect(entity: Entity, frame: pd.DataFrame) -> pd.DataFrame:
    """Field protection (encryption, blind indexes) happens here, before anything is staged on disk.

    Pass-through until protection policies are part of the mapping language.
    """
    del entity
    return frame


def process_batch(ctx: RunContext, entity: Entity, batch_no: int, first_seq: int, batch: SourceBatch) -> int:
    """Cleanse, validate, protect and stage one extracted batch; returns the number of rows staged."""
    cleansed = cleanse(ctx.mapping, entity, batch.frame, batch.row_numbers)
    quarantined = [
        QuarantineRecord(r.row_number, None, "extract", r.reason,
                         [{"field": "", "code": r.reason, "detail": r.detail}])
        for r in batch.rejected
    ]
    quarantined += [
        QuarantineRecord(row, cleansed.keys.get(row), "validate", problems[0].code,
                         [{"field": p.field, "code": p.code, "detail": p.detail} for p in problems])
        for row, problems in cleansed.quarantined.items()
    ]
    staged = protect(entity, cleansed.frame)
    source_rows = len(batch.frame) + len(batch.rejected)
    ctx.staging.stage_batch(entity, batch_no, first_seq, staged, source_rows, quarantined)
    ctx.audit.append("batch_staged", entity=entity.name, batch=batch_no, source_rows=source_rows,
                     staged=len(staged), quarantined=len(quarantined))
    ctx.progress.advance(entity.name, "extract", source_rows)
    return len(staged)


def after_staging(ctx: RunContext, entity: Entity) -> None:
    """Checks that need the whole entity: a source key may appear only once."""
    duplicates = ctx.staging.quarantine_duplicate_keys(entity)
    if duplicates:
        log.warning("entity %s: %d rows share a source key with an earlier row (quarantined)",
                    entity.name, duplicates)


def dedupe(ctx: RunContext, entity: Entity) -> None:
    """Global matching and survivorship over staging. Pass-through until matching rules exist."""
    ctx.staging.mark(entity.name, "dedupe", "skipped")


# --- load --------------------------------------------------------------------------------------------------


def load_ranges(ctx: RunContext, entity: Entity) -> list[tuple[int, int]]:
    last = ctx.staging.max_seq(entity)
    size = ctx.mapping.batch_size
    return [(start, min(start + size - 1, last)) for start in range(0, last + 1, size)]


def _python_values(series: pd.Series, kind: str) -> list[Any]:
    """Column values as the Python objects a DB-API driver expects (None for missing)."""
    present = series.notna().tolist()
    raw = series.astype(object).tolist()
    convert = _CONVERTERS.get(kind, lambda v: v)
    return [convert(v) if ok else None for v, ok in zip(raw, present, strict=True)]


def _to_timestamp(value: Any) -> dt.datetime:
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return stamp.tz_convert("UTC").to_pydatetime()


_CONVERTERS = {
    "string": str,
    "integer": int,
    "decimal": lambda v: Decimal(str(v)),
    "float": float,
    "boolean": bool,
    "date": lambda v: v if isinstance(v, dt.date) and not isinstance(v, dt.datetime) else pd.Timestamp(v).date(),
    "timestamp": _to_timestamp,
}


def load_batch(ctx: RunContext, entity: Entity, first_seq: int, last_seq: int) -> dict[str, int]:
    """Resolve references, compare with the target, upsert what changed and write the ledger."""
    frame = ctx.staging.rows_for_load(entity, first_seq, last_seq, ctx.dry_run)
    target = ctx.target(entity.target)
    quarantined: list[QuarantineRecord] = []

    keep = pd.Series(True, index=frame.index)
    for spec in (f for f in entity.fields.values() if f.ref):
        wanted = frame[spec.name].notna()
        missing = wanted & ~frame[f"{spec.name}__resolved"].astype(bool)
        for position in frame.index[missing & keep]:
            quarantined.append(QuarantineRecord(
                int(frame.at[position, "_row"]), frame.at[position, "_key"], "load", "unresolved_reference",
                [{"field": spec.name, "code": "unresolved_reference",
                  "detail": f"no loaded `{spec.ref}` row has this key"}]))
        keep &= ~missing
        frame[spec.name] = frame[f"{spec.name}__target"]
    frame = frame[keep].reset_index(drop=True)

    exts = frame["_ext"].tolist()
    desired = {name: _python_values(frame[name], spec.type) for name, spec in entity.fields.items()}
    existing = target.fetch_existing(entity, exts) if exts else {}

    actions: list[str] = []
    changed_fields: list[list[str]] = []
    before_images: list[str | None] = []
    to_write: list[dict[str, Any]] = []
    names = list(entity.fields)
    for i, ext in enumerate(exts):
        row = {name: desired[name][i] for name in names}
        current = existing.get(ext)
        if current is None:
            if entity.mode == "update":
                quarantined.append(QuarantineRecord(
                    int(frame.at[i, "_row"]), frame.at[i, "_key"], "load", "not_in_target",
                    [{"field": entity.external_id_column, "code": "not_in_target",
                      "detail": "mode is `update` and the target has no row with this external id"}]))
                actions.append("")
                changed_fields.append([])
                before_images.append(None)
                continue
            actions.append("created")
            changed_fields.append(names)
            before_images.append(None)
            to_write.append({entity.external_id_column: ext, **row})
            continue
        changed = [n for n in names
                   if canonical(row[n], entity.fields[n].type) != canonical(current.values[n], entity.fields[n].type)]
        if not changed or entity.mode == "insert":
            actions.append("unchanged")
            changed_fields.append([])
            before_images.append(None)
            continue
        actions.append("updated")
        changed_fields.append(changed)
        before_images.append(json.dumps({n: canonical(current.values[n], entity.fields[n].type) for n in changed}))
        to_write.append({entity.external_id_column: ext, **row})

    failed: dict[str, str] = {}
    if to_write and not ctx.dry_run:
        for failure in target.write(entity, to_write):
            failed[failure.external_id] = failure.detail
    created = [ext for ext, action in zip(exts, actions, strict=True) if action == "created" and ext not in failed]
    if entity.target_key_column == entity.external_id_column:
        new_keys = {ext: ext for ext in created}
    elif ctx.dry_run or not created:
        new_keys = {}
    else:
        new_keys = target.target_keys(entity, created)

    ledger: list[tuple[Any, ...]] = []
    for i, ext in enumerate(exts):
        action = actions[i]
        if not action:
            continue
        row_no, key = int(frame.at[i, "_row"]), frame.at[i, "_key"]
        if ext in failed:
            quarantined.append(QuarantineRecord(row_no, key, "load", "target_rejected",
                                                [{"field": "", "code": "target_rejected", "detail": failed[ext]}]))
            continue
        target_key = new_keys.get(ext) if action == "created" else existing[ext].target_key
        ledger.append((row_no, key, ext, target_key, action, changed_fields[i], before_images[i]))

    ctx.staging.con.begin()
    ctx.staging.add_ledger(entity, ledger)
    ctx.staging.add_quarantine(entity, quarantined)
    ctx.staging.con.commit()
    counts = {"created": actions.count("created"), "updated": actions.count("updated"),
              "unchanged": actions.count("unchanged"), "quarantined": len(quarantined)}
    counts["created"] -= sum(1 for ext in failed if existing.get(ext) is None)
    counts["updated"] -= sum(1 for ext in failed if existing.get(ext) is not None)
    ctx.audit.append("batch_loaded" if not ctx.dry_run else "batch_planned", entity=entity.name,
                     first_seq=first_seq, last_seq=last_seq, fields=names, **counts)
    ctx.progress.advance(entity.name, "load", last_seq - first_seq + 1)
    return counts


def reconcile(ctx: RunContext) -> list[EntityReconciliation]:
    return [reconcile_entity(ctx.staging, e.name) for e in ctx.mapping.load_order()]
