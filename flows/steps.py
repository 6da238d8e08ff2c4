"""The stages of one entity's migration as plain functions; `flows.migrate` runs them as Prefect tasks.

extract -> cleanse -> validate -> protect -> stage -> dedupe -> load -> reconcile
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from crmbridge import failpoints
from crmbridge.audit import AuditTrail
from crmbridge.audit import records as audit_records
from crmbridge.checkpoints import Checkpoints
from crmbridge.connectors import connector_for
from crmbridge.connectors.base import Connector, Source, SourceBatch, Target
from crmbridge.errors import SchemaDriftError
from crmbridge.flows.progress import NoProgress, Progress
from crmbridge.flows.reconcile import EntityReconciliation, reconcile_entity
from crmbridge.mappings import rules
from crmbridge.mappings.cleanse import cleanse, shown_as
from crmbridge.mappings.model import Entity, Mapping
from crmbridge.protection import load as protection_load
from crmbridge.protection.policy import protector_for
from crmbridge.runs import RunDir
from crmbridge.staging import QuarantineRecord, Staging
from crmbridge.values import RowBatch, bulk_work, canonical, same_value

log = logging.getLogger("crmbridge.run")


@dataclass
class RunContext:
    mapping: Mapping
    run: RunDir
    staging: Staging
    audit: AuditTrail
    dry_run: bool = False
    progress: Progress = field(default_factory=NoProgress)
    checkpoints: Checkpoints | None = None  # journals load batches, so a crashed run can resume
    distributed: bool = False  # batches are prepared on the task runner's workers (e.g. a Dask cluster)
    dedupe_jobs: Any = None  # runs dedupe's parts on those workers (crmbridge.dedupe.partition.RunJobs)
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

    def usage(self) -> dict[str, dict[str, Any]]:
        """API usage of the targets that count it (Salesforce: calls, retries, the org's quota), by target."""
        return {name: t.usage() for name, t in self._targets.items() if callable(getattr(t, "usage", None))}

    def close(self) -> None:
        for target in self._targets.values():
            target.close()
        self._targets.clear()


# --- extract: schema drift ------------------------------------------------------------------------------

_COMPATIBLE = {
    "string": {"string"}, "integer": {"integer"}, "decimal": {"decimal", "integer", "float"},
    "float": {"float", "decimal", "integer"}, "boolean": {"boolean", "integer"},
    "date": {"date", "timestamp"},
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
            problems.append(f"column `{column}` holds naive timestamps ({info.native}); declare its time "
                            "zone (`timezone` on the column, the source, or in settings)")
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise SchemaDriftError(f"entity `{entity.name}`: source `{entity.source}` ({where}) does not match "
                               f"the mapping:\n{listing}\nfound columns: {', '.join(found)}")


# --- cleanse, validate, protect, stage -------------------------------------------------------------------


def protect(entity: Entity, frame: pd.DataFrame, mapping: Mapping | None = None) -> pd.DataFrame:
    """Field protection (encryption, blind indexes, hashes, drops) happens here, before anything is staged on
    disk (`crmbridge.protection.policy`)."""
    protector = protector_for(mapping) if mapping is not None and mapping.protection is not None else None
    return frame if protector is None else protector.protect_frame(entity, frame)


def process_batch(ctx: RunContext, entity: Entity, batch_no: int, first_seq: int, batch: SourceBatch) -> int:
    """Cleanse, validate, protect and stage one extracted batch; returns the number of rows staged."""
    return stage_prepared(ctx, entity, batch_no, first_seq, prepare_batch(ctx.mapping, entity, batch))


@dataclass
class PreparedBatch:
    """A batch cleansed, validated and protected: what staging receives (nothing here is plaintext that the
    mapping protects, so it may cross a process or network boundary)."""

    frame: pd.DataFrame
    quarantined: list[QuarantineRecord]
    source_rows: int
    warnings: dict[tuple[str, str], int]


def prepare_batch(mapping: Mapping, entity: Entity, batch: SourceBatch) -> PreparedBatch:
    """The pure part of a batch's processing: no staging, no run state, so it runs on any worker (a Dask
    cluster's too) and gives the same result wherever it runs."""
    with bulk_work():
        cleansed = cleanse(mapping, entity, batch.frame, batch.row_numbers)
        quarantined = [
            QuarantineRecord(r.row_number, None, "extract", r.reason,
                             [{"field": "", "code": r.reason, "detail": r.detail}])
            for r in batch.rejected
        ]
        quarantined += [
            QuarantineRecord(row, cleansed.keys.get(row), "validate", problems[0].code,
                             [p.as_dict() for p in problems])
            for row, problems in cleansed.quarantined.items()
        ]
        staged = protect(entity, cleansed.frame, mapping)
        return PreparedBatch(staged, quarantined, len(batch.frame) + len(batch.rejected), dict(cleansed.warnings))


def stage_prepared(ctx: RunContext, entity: Entity, batch_no: int, first_seq: int, prepared: PreparedBatch) -> int:
    """Stage a prepared batch in the run's store, in batch order; returns the number of rows staged."""
    staged, quarantined, source_rows = prepared.frame, prepared.quarantined, prepared.source_rows
    with bulk_work():
        ctx.staging.stage_batch(entity, batch_no, first_seq, staged, source_rows, quarantined)
    ctx.audit.append("batch_staged", entity=entity.name, batch=batch_no, source_rows=source_rows,
                     staged=len(staged), quarantined=len(quarantined))
    if not ctx.dry_run:
        audit_records.quarantined(ctx.audit, entity, quarantined)
    for (fname, code), count in prepared.warnings.items():  # e.g. `truncate`: loaded, but never silently
        log.warning("entity %s: field %s: %d rows %s", entity.name, fname, count, code)
    ctx.progress.advance(entity.name, "extract", source_rows)
    return len(staged)


def after_staging(ctx: RunContext, entity: Entity) -> None:
    """Checks that need the whole entity: a source key may appear only once."""
    duplicates = ctx.staging.quarantine_duplicate_keys(entity)
    if duplicates:
        log.warning("entity %s: %d rows share a source key with an earlier row (quarantined)",
                    entity.name, duplicates)
    rules.check_staged(ctx.staging, entity, shown_as)  # `unique` and `exists_in` rules need the whole entity


def dedupe(ctx: RunContext, entity: Entity) -> None:
    """Global matching and survivorship over staging (crmbridge.dedupe), when the entity has `dedupe:`."""
    if entity.dedupe is None:
        ctx.staging.mark(entity.name, "dedupe", "skipped")
        return
    from crmbridge.dedupe.engine import dedupe_entity, review_path

    existing = None
    if entity.dedupe.match_target:
        from crmbridge.dedupe.target import read_target_rows

        existing = read_target_rows(ctx.mapping, entity)
    stats = dedupe_entity(ctx.staging, entity, review_path(ctx.mapping, entity), ctx.run.path, existing,
                          run_jobs=ctx.dedupe_jobs)
    log.info("entity %s: dedupe compared %s pairs, merged %s rows into %s clusters, %s pairs for review",
             entity.name, stats.get("pairs_compared"), stats.get("merged_rows"), stats.get("clusters"),
             stats.get("review_pairs"))


def after_load(ctx: RunContext, entity: Entity) -> None:
    """Absorbed rows enter the ledger as `merged`, with their survivor's target key."""
    if entity.dedupe is not None:
        from crmbridge.dedupe.engine import record_merges

        keys, targets = record_merges(ctx.staging, entity)
        ctx.audit.records("record_merged", entity.name, keys, target_ids=targets)


# --- load --------------------------------------------------------------------------------------------------


def load_ranges(ctx: RunContext, entity: Entity) -> list[tuple[int, int]]:
    last = ctx.staging.max_seq(entity)
    size = ctx.mapping.batch_size
    return [(start, min(start + size - 1, last)) for start in range(0, last + 1, size)]


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
    "date": lambda v: (v if isinstance(v, dt.date) and not isinstance(v, dt.datetime)
                       else pd.Timestamp(v).date()),
    "timestamp": _to_timestamp,
}

# Staged column types whose Arrow values already are what the converter of the field type returns.
_ARROW_NATIVE = {
    "string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
    "integer": pa.types.is_integer,
    "boolean": pa.types.is_boolean,
    "date": pa.types.is_date32,
}


def _arrow_values(column: pa.ChunkedArray, kind: str) -> list[Any]:
    """A staged Arrow column as the Python objects a DB-API driver expects (None for missing)."""
    # Through NumPy, Arrow dates become `datetime.date` objects some twenty times faster than `to_pylist`.
    values = (column.to_numpy(zero_copy_only=False).tolist() if pa.types.is_date32(column.type)
              else column.to_pylist())
    native = _ARROW_NATIVE.get(kind)
    if native is not None and native(column.type):
        return values
    if kind == "float" and pa.types.is_floating(column.type):
        return [None if v is None or v != v else v for v in values]  # NaN is missing, as in pandas
    if kind == "timestamp" and pa.types.is_timestamp(column.type) and column.type.tz == "UTC":
        return [None if v is None else v.replace(tzinfo=dt.UTC) for v in values]
    if kind == "decimal" and pa.types.is_string(column.type):  # staged as text: Decimal(str(v)) is Decimal(v)
        return [None if v is None else Decimal(v) for v in values]
    convert = _CONVERTERS.get(kind, lambda v: v)
    return [None if v is None else convert(v) for v in values]


def written_values(entity: Entity, table: pa.Table, refs: dict[str, pa.ChunkedArray],
                   left_out: Collection[str] = ()) -> list[list[Any]]:
    """Per field, the values a load writes for these staged rows (`refs`: resolved parent keys by field).
    Fields in `left_out` get an empty list: the caller makes their values from the staged columns itself.

    Rollback calls it too: these values are the run's after-image it compares the target with."""
    return [[] if n in left_out else _arrow_values(refs[n] if n in refs else table.column(n), spec.type)
            for n, spec in entity.fields.items()]


def before_image(entity: Entity, values: dict[str, Any], changed: list[str]) -> str:
    """What rollback needs to undo an update: the target's values of exactly the fields it changes, as canonical
    text (JSON). Protected fields belong here in their staged (encrypted) form."""
    return json.dumps({n: canonical(values[n], entity.fields[n].type) for n in changed})


def load_batch(ctx: RunContext, entity: Entity, first_seq: int, last_seq: int) -> dict[str, int]:
    """Resolve references, compare with the target, upsert what changed and write the ledger.

    Column-wise throughout: the staged rows arrive as Arrow columns, values are converted per column, and
    per-row Python work is limited to comparing with rows the target already has. Three parts, so the
    write can run elsewhere (`flows.migrate` sends it to a Dask worker): `plan_load` and `record_load` need
    the run's staging store, `write_batch` only the target.
    """
    with bulk_work():
        plan = plan_load(ctx, entity, first_seq, last_seq)
        written = (write_batch(ctx.mapping, ctx.target(entity.target), entity, plan.job)
                   if plan.job is not None else nothing_written(entity))
        return record_load(ctx, entity, plan, written)


def nothing_written(entity: Entity) -> WriteResult:
    """The result of a batch with nothing to write (all unchanged, or a dry run): no row refused, no new keys."""
    return WriteResult({}, None if entity.target_key_column == entity.external_id_column else {})


@dataclass
class WriteJob:
    """What one batch's write needs, and nothing more: it may cross a process or network boundary, so a
    protected field the target receives in plaintext travels sealed and is decrypted by the writer."""

    columns: dict[str, list[Any]]  # target column -> values, the external id column first
    created: list[str]  # external ids of the rows the target does not hold yet
    want_keys: bool  # the target assigns its own keys: look up those of the created rows after the write
    decrypt: list[str] = field(default_factory=list)  # fields to decrypt for the target, by the writer


@dataclass
class WriteResult:
    failed: dict[str, str]  # external id -> why the target refused the row (class and constraint, no values)
    new_keys: dict[str, Any] | None  # external id -> target key of created rows (None: the external id is)


@dataclass
class LoadPlan:
    """One batch compared with the target: an action per row, journalled before anything is written."""

    first_seq: int
    last_seq: int
    table: pa.Table  # the staged rows that reached the comparison (unresolved references filtered out)
    names: list[str]
    desired: list[list[Any]]  # per field, what the target receives
    exts: list[str]
    actions: list[str]  # per row: "" (quarantined), created, updated, unchanged
    changed_fields: list[list[str] | None]
    before_images: list[str | None]
    currents: list[Any]
    present: list[int]
    quarantined: list[QuarantineRecord]
    job: WriteJob | None  # None: nothing to write (all unchanged, or a dry run)


def plan_load(ctx: RunContext, entity: Entity, first_seq: int, last_seq: int) -> LoadPlan:
    table = ctx.staging.rows_for_load_arrow(entity, first_seq, last_seq)
    target = ctx.target(entity.target)
    quarantined: list[QuarantineRecord] = []

    keep = np.ones(table.num_rows, dtype=bool)
    refs: dict[str, pa.ChunkedArray] = {}
    for spec in (f for f in entity.fields.values() if f.ref):
        wanted = table.column(spec.name).is_valid().to_numpy(zero_copy_only=False)
        resolved = table.column(f"{spec.name}__resolved").fill_null(False).to_numpy(zero_copy_only=False)
        missing = wanted & ~resolved.astype(bool)
        unresolved = np.flatnonzero(missing & keep)
        if len(unresolved):
            rows, keys = table.column("_row").take(unresolved), table.column("_key").take(unresolved)
            for row_no, key in zip(rows.to_pylist(), keys.to_pylist(), strict=True):
                quarantined.append(QuarantineRecord(
                    row_no, key, "load", "unresolved_reference",
                    [{"field": spec.name, "code": "unresolved_reference",
                      "detail": f"no loaded `{spec.ref}` row has this key"}]))
        keep &= ~missing
        refs[spec.name] = table.column(f"{spec.name}__target")
    if refs:
        table = table.filter(pa.array(keep)) if not keep.all() else table
        refs = {name: table.column(f"{name}__target") for name in refs}

    names = list(entity.fields)
    kinds = [entity.fields[n].type for n in names]
    exts: list[str] = table.column("_ext").to_pylist()
    # Protected fields the protection step makes from the staged columns are not converted here first.
    left_out = (protection_load.from_staged_columns(ctx.mapping, entity, ctx.distributed)
                if ctx.mapping.protection is not None else ())
    desired = written_values(entity, table, refs, left_out)
    sealed = list(desired)  # the staged values: what a writer elsewhere receives for fields it decrypts
    existing = target.fetch_existing(entity, exts) if exts and not _empty_when_prepared(target, entity) else {}
    if ctx.mapping.protection is not None:  # plaintext only now, at the last moment, if the target takes it
        protection_load.prepare(ctx.mapping, entity, table, desired, existing, exts)

    # One action per row: "" (quarantined: not in the target in `update` mode), created, updated, unchanged.
    currents = [existing.get(ext) for ext in exts] if existing else [None] * len(exts)
    present = [i for i, current in enumerate(currents) if current is not None] if existing else []
    new_action = "" if entity.mode == "update" else "created"
    actions = [new_action] * len(exts)
    changed_fields: list[list[str] | None] = [None] * len(exts)
    before_images: list[str | None] = [None] * len(exts)
    for i in present:
        actions[i], changed_fields[i] = "unchanged", []
    if present and entity.mode != "insert":
        differs = [
            [not same_value(column[i], currents[i].values[name], kind) for i in present]
            for name, kind, column in zip(names, kinds, desired, strict=True)
        ]
        for i, flags in zip(present, zip(*differs, strict=True), strict=True):
            if not any(flags):
                continue
            changed = [name for name, flag in zip(names, flags, strict=True) if flag]
            values = currents[i].values
            actions[i] = "updated"
            changed_fields[i] = changed
            before_images[i] = before_image(entity, values, changed)
    if ctx.mapping.protection is not None:
        protection_load.seal_before_images(ctx.mapping, entity, exts, before_images)
    if ctx.checkpoints is not None and not ctx.dry_run:
        _follow_journal(ctx.checkpoints, entity, first_seq, exts, actions, changed_fields, before_images)
    if new_action == "":
        for i in (i for i, action in enumerate(actions) if not action):
            quarantined.append(QuarantineRecord(
                *_row_and_key(table, i), "load", "not_in_target",
                [{"field": entity.external_id_column, "code": "not_in_target",
                  "detail": "mode is `update` and the target has no row with this external id"}]))

    job = None
    writing: Sequence[int] = (range(len(exts)) if new_action and not present  # all new
                              else [i for i, action in enumerate(actions) if action in ("created", "updated")])
    if writing and not ctx.dry_run:
        decrypt = sealed_for_writer(ctx, entity) if ctx.distributed else []
        values = [sealed[j] if name in decrypt else desired[j] for j, name in enumerate(names)]
        columns = [exts, *values]
        if len(writing) != len(exts):
            columns = [[column[i] for i in writing] for column in columns]
        created = [ext for ext, action in zip(exts, actions, strict=True) if action == "created"]
        job = WriteJob(dict(zip([entity.external_id_column, *names], columns, strict=True)), created,
                       entity.target_key_column != entity.external_id_column, decrypt)
    return LoadPlan(first_seq, last_seq, table, names, desired, exts, actions, changed_fields, before_images,
                    currents, present, quarantined, job)


def _empty_when_prepared(target: Target, entity: Entity) -> bool:
    """A target table that was empty when the run prepared it holds only rows of this run, and rows of two
    batches (or two entities) never share an external id: nothing to look up (a first migration's every
    batch; measured: a third of the write's time on SQLite)."""
    check = getattr(target, "empty_when_prepared", None)
    return bool(check(entity)) if check is not None else False


def sealed_for_writer(ctx: RunContext, entity: Entity) -> list[str]:
    """Protected fields the target receives in plaintext: a writer in another process gets them sealed."""
    if ctx.mapping.protection is None:
        return []
    from crmbridge.protection.mapping_rules import receives_plaintext
    from crmbridge.protection.policy import ENCRYPTED

    if not receives_plaintext(ctx.mapping, entity.target):
        return []
    return [name for name, spec in entity.fields.items() if spec.protect in ENCRYPTED]


def write_batch(mapping: Mapping, target: Target, entity: Entity, job: WriteJob) -> WriteResult:
    """Upsert one planned batch and look up the keys the target gave its new rows. Needs only the target, so
    it runs in the flow or on a worker with a target connection of its own (`worker_target`)."""
    columns = job.columns
    if job.decrypt:  # decrypted here, at the last moment, in the process that talks to the target
        protector, exts = protector_for(mapping), columns[entity.external_id_column]
        columns = {name: (protector.decrypt_values(entity.name, name, values, exts) if name in job.decrypt
                          else values) for name, values in columns.items()}
    failed: dict[str, str] = {}
    failpoints.reach("load.before_write")
    for failure in target.write(entity, RowBatch(columns)):
        failed[failure.external_id] = failure.detail
    failpoints.reach("load.after_write")
    if not job.want_keys:
        return WriteResult(failed, None)  # a created row's target key is its external id
    created = [ext for ext in job.created if ext not in failed]
    return WriteResult(failed, target.target_keys(entity, created) if created else {})


_WORKER_TARGETS: dict[tuple[str, str], Target] = {}


def worker_target(mapping: Mapping, entity: Entity) -> Target:
    """A worker process's own connection to an entity's target, opened once per process and entity (the flow
    has checked or created the table before any write is sent out)."""
    key = (mapping.sha256, entity.name)
    if key not in _WORKER_TARGETS:
        target = connector_for(mapping.targets[entity.target], mapping).open_target()
        target.prepare(entity, False)
        _WORKER_TARGETS[key] = target
    return _WORKER_TARGETS[key]


def _row_and_key(table: pa.Table, i: int) -> tuple[int, str | None]:
    return table.column("_row")[i].as_py(), table.column("_key")[i].as_py()


def record_load(ctx: RunContext, entity: Entity, plan: LoadPlan, written: WriteResult) -> dict[str, int]:
    """The ledger, quarantine, checkpoint and audit events of a written (or planned) batch, in one staging
    transaction."""
    table, names, desired, quarantined = plan.table, plan.names, plan.desired, plan.quarantined
    exts, actions, changed_fields, before_images, currents = (plan.exts, plan.actions, plan.changed_fields,
                                                             plan.before_images, plan.currents)
    failed, new_keys = written.failed, written.new_keys
    new_action = "" if entity.mode == "update" else "created"
    ledger_rows = range(len(exts)) if new_action else [i for i, action in enumerate(actions) if action]
    if failed:
        for i in ledger_rows:
            if exts[i] in failed:
                quarantined.append(QuarantineRecord(
                    *_row_and_key(table, i), "load", "target_rejected",
                    [{"field": "", "code": "target_rejected", "detail": failed[exts[i]]}]))
        ledger_rows = [i for i in ledger_rows if exts[i] not in failed]
    row_nos, keys, ext_column = table.column("_row"), table.column("_key"), table.column("_ext")
    if len(ledger_rows) != len(exts):
        taken = pa.array(ledger_rows, pa.int64())
        row_nos, keys, ext_column = row_nos.take(taken), keys.take(taken), ext_column.take(taken)
        pick = [exts, actions, changed_fields, before_images, currents]
        exts, actions, changed_fields, before_images, currents = ([column[i] for i in ledger_rows] for column in pick)
    if new_keys is None and not plan.present:
        target_keys: pa.ChunkedArray | list[Any] = ext_column  # all created: the external ids themselves
    else:
        target_keys = [
            (ext if new_keys is None else new_keys.get(ext)) if action == "created" else current.target_key
            for ext, action, current in zip(exts, actions, currents, strict=True)
        ]

    # Record-level audit (lineage of every created/updated/quarantined row) is handed to the writer process
    # before the ledger marks the batch loaded: a run killed in between loads the batch again on resume and
    # sends its events again, so every loaded row has its event at least once (the writer outlives the run's
    # process and drains what it was sent).
    if not ctx.dry_run:
        audit_records.loaded(ctx.audit, ctx.mapping, entity, table, names, desired, ledger_rows, keys, target_keys,
                             actions, changed_fields)
        audit_records.quarantined(ctx.audit, entity, quarantined)
    ctx.staging.con.begin()
    ctx.staging.add_ledger_columns(entity, row_nos, keys, ext_column, target_keys, actions, changed_fields,
                                   before_images)
    ctx.staging.add_quarantine(entity, quarantined)
    if ctx.checkpoints is not None and not ctx.dry_run:
        ctx.checkpoints.mark_loaded(entity.name, plan.first_seq, plan.last_seq)
    ctx.staging.con.commit()
    failpoints.reach("load.after_ledger")
    counts = {"created": actions.count("created"), "updated": actions.count("updated"),
              "unchanged": actions.count("unchanged"), "quarantined": len(quarantined)}
    ctx.audit.append("batch_loaded" if not ctx.dry_run else "batch_planned", entity=entity.name,
                     first_seq=plan.first_seq, last_seq=plan.last_seq, fields=names, **counts)
    ctx.progress.advance(entity.name, "load", plan.last_seq - plan.first_seq + 1)
    return counts


def _follow_journal(checkpoints: Checkpoints, entity: Entity, first_seq: int, exts: list[str], actions: list[str],
                    changed_fields: list[list[str] | None], before_images: list[str | None]) -> None:
    """Journal this batch's plan before the target sees it; when resuming a batch an earlier attempt may have
    half written, take the journalled action of every row that attempt already changed instead."""
    plan = checkpoints.plan(entity.name, first_seq)
    if plan is not None:
        for i, ext in enumerate(exts):
            planned = plan.action_for(ext)
            if planned is not None and actions[i] in ("unchanged", "updated"):
                actions[i], changed_fields[i], before_images[i] = planned
    checkpoints.journal(entity.name, first_seq, exts, actions, changed_fields, before_images)


def reconcile(ctx: RunContext) -> list[EntityReconciliation]:
    return [reconcile_entity(ctx.staging, e.name) for e in ctx.mapping.load_order()]
