"""One incremental sync cycle as the Prefect flow `crmbridge-sync`.

Per entity with a `sync:` block: read the source's changes since the stored watermark minus the overlap,
split off deleted records (tombstones), then run the live ones through the migrate stages (cleanse,
validate, protect, stage, dedupe, load: the same Prefect tasks as `crmbridge-migrate`), apply the conflict
policy before loading and the delete policy after it, reconcile, and only then store the new watermark:
the newest change timestamp the cycle read, on the source's own clock. A cycle that fails anywhere stores
nothing, so the next one reads the same changes again; every write is an idempotent upsert on the external
id, so reading a change twice never duplicates it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import traceback
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger

from crmbridge.audit.project import open_trail
from crmbridge.connectors.base import RestoreRow, SourceBatch
from crmbridge.errors import CrmbridgeError, ReconciliationError, SourceError, TargetError
from crmbridge.flows import steps
from crmbridge.flows.migrate import Opaque, dedupe_task, load_batch_task, stage_batch_task
from crmbridge.flows.reconcile import unbalanced_message
from crmbridge.mappings import load_mapping
from crmbridge.mappings.cleanse import external_ids, source_keys
from crmbridge.mappings.envvars import Redactor
from crmbridge.mappings.model import Entity, Mapping
from crmbridge.runs import Manifest, RunDir, create_run
from crmbridge.staging import Staging, table_name

log = logging.getLogger("crmbridge.sync")

_TRUE = {"true", "1", "yes", "y", "t"}


# --- the watermark store ------------------------------------------------------------------------------


class Watermarks:
    """Per entity, the newest source change timestamp a successful cycle loaded (`<state_dir>/sync.json`)."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / "sync.json"

    def all(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        return json.loads(self.path.read_text(encoding="utf-8"))

    def get(self, entity: str) -> datetime | None:
        stored = self.all().get(entity, {}).get("watermark")
        return datetime.fromisoformat(stored) if stored else None

    def save(self, updates: dict[str, datetime | None], run_id: str) -> None:
        data = self.all()
        now = datetime.now(UTC).isoformat()
        for entity, mark in updates.items():
            stored = data.get(entity, {}).get("watermark")
            if mark is not None and (stored is None or mark > datetime.fromisoformat(stored)):  # never back
                data[entity] = {"watermark": mark.isoformat(), "run_id": run_id, "saved_at": now}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data, indent=2), encoding="utf-8")
        temporary.replace(self.path)  # atomic: a crash keeps the old watermarks whole


# --- one cycle ------------------------------------------------------------------------------------------


@dataclass
class EntityChanges:
    since: datetime | None
    watermark: datetime | None  # the newest change read (None: nothing read, keep the stored one)
    read: int = 0
    deleted: list[str] = field(default_factory=list)  # external ids of tombstones
    applied_deletes: int = 0
    conflicts_kept: int = 0


def sync_entities(mapping: Mapping) -> list[Entity]:
    return [e for e in mapping.load_order() if e.sync is not None]


# A served deployment runs each flow run in a fresh process that imports this module, so the retry policy
# `crmbridge schedule --retries` chose travels in the environment (and in the deployment's job variables).
RETRIES_ENV, RETRY_DELAY_ENV = "CRMBRIDGE_SYNC_RETRIES", "CRMBRIDGE_SYNC_RETRY_DELAY"


@flow(name="crmbridge-sync", validate_parameters=False, retries=int(os.environ.get(RETRIES_ENV) or 0),
      retry_delay_seconds=int(os.environ.get(RETRY_DELAY_ENV) or 60))
def sync_flow(mapping_path: str, webhook: str | None = None) -> dict[str, Any]:
    """One incremental cycle; creates its own run directory so a Prefect retry starts a fresh run."""
    mapping = load_mapping(mapping_path)
    with cycle_lock(mapping):
        return _locked_cycle(mapping, webhook)


@contextlib.contextmanager
def cycle_lock(mapping: Mapping) -> Iterator[None]:
    """One cycle per mapping at a time: two overlapping cycles could write an older version of a record
    after a newer one, behind a watermark that has already moved past it."""
    mapping.state_dir.mkdir(parents=True, exist_ok=True)
    with (mapping.state_dir / "sync.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CrmbridgeError(f"another sync cycle of `{mapping.name}` is running (lock "
                                 f"{mapping.state_dir / 'sync.lock'}); this one did nothing") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _locked_cycle(mapping: Mapping, webhook: str | None) -> dict[str, Any]:
    run = create_run(mapping.state_dir)
    manifest = Manifest(run_id=run.run_id, mapping_name=mapping.name, mapping_path=str(mapping.path),
                        mapping_sha256=mapping.sha256, dry_run=False, started_at=_now())
    run.write_manifest(manifest)
    try:
        return run_cycle(mapping, run, manifest)
    except BaseException as error:
        message = Redactor(mapping.secrets)(str(error)) if isinstance(error, CrmbridgeError) else type(error).__name__
        notify(webhook, {"event": "crmbridge.sync.failed", "mapping": mapping.name, "run_id": run.run_id,
                         "error": message})
        raise


def run_cycle(mapping: Mapping, run: RunDir, manifest: Manifest) -> dict[str, Any]:
    entities = sync_entities(mapping)
    if not entities:
        raise CrmbridgeError(f"{mapping.path}: no entity has a `sync:` block; expected `sync: {{watermark: "
                             "<column>}}` on each entity to sync")
    staging = Staging(run.staging_path)
    audit = open_trail(mapping, run.run_id, manifest.operator)  # the project's audit store (settings.audit)
    audit.start_writer()  # it boots while the sources are read
    ctx = steps.RunContext(mapping, run, staging, audit)
    store = Watermarks(mapping.state_dir)
    logger = _logger()
    audit.append("run_started", entities=[e.name for e in entities], details={"kind": "sync"})
    try:
        changes = {e.name: stage_changes(ctx, e, store.get(e.name)) for e in entities}
        for entity in entities:
            ctx.target(entity.target).prepare(entity, False)
        for entity in entities:
            changes[entity.name].conflicts_kept = apply_conflict_policy(ctx, entity)
            for first, last in steps.load_ranges(ctx, entity):
                load_batch_task(Opaque(ctx), entity, first, last)
        for entity in reversed(entities):  # children before their parents
            changes[entity.name].applied_deletes = apply_deletes(ctx, entity, changes[entity.name].deleted)
        results = [r for r in steps.reconcile(ctx) if r.entity in changes]
        problem = unbalanced_message(results)
        if problem:
            raise ReconciliationError(problem)
        summary = {"run_id": run.run_id, "entities": [
            {**r.as_dict(), "since": _iso(changes[r.entity].since), "watermark": _iso(changes[r.entity].watermark),
             "read": changes[r.entity].read, "deleted": changes[r.entity].applied_deletes,
             "tombstones": len(changes[r.entity].deleted), "conflicts_kept": changes[r.entity].conflicts_kept}
            for r in results]}
        run.write_reconciliation(summary)
        # Only now, with every change loaded and reconciled, does the watermark move.
        store.save({name: c.watermark for name, c in changes.items()}, run.run_id)
        manifest.status = "succeeded"
        audit.append("run_finished", outcome="succeeded", details={"kind": "sync"},
                     totals={e["entity"]: {k: e[k] for k in ("read", "created", "updated", "unchanged", "quarantined",
                                                             "deleted", "tombstones", "conflicts_kept") if k in e}
                             for e in summary["entities"]})
        audit.checkpoint()  # signed: chain head and the Merkle root of this sync's events
        return summary
    except BaseException as error:
        manifest.status = "failed"
        manifest.error = (Redactor(mapping.secrets)(str(error)) if isinstance(error, CrmbridgeError)
                          else type(error).__name__)
        audit.append("run_finished", outcome="failed", reason=_reason_code(error), details={"kind": "sync"})
        logger.error("sync %s failed: %s", run.run_id, manifest.error)
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        manifest.finished_at = _now()
        run.write_manifest(manifest)
        ctx.close()
        staging.close()
        with contextlib.suppress(Exception):  # flushed by the checkpoint already; never mask the sync's error
            audit.close()


def stage_changes(ctx: steps.RunContext, entity: Entity, stored: datetime | None) -> EntityChanges:
    """Read the changes since `stored` minus the overlap; stage live records, collect tombstones."""
    assert entity.sync is not None
    spec = entity.sync
    connector = ctx.connector(entity.source, "source")
    open_changes = getattr(connector, "open_changes", None)
    if open_changes is None:
        raise SourceError(f"entity `{entity.name}`: source `{entity.source}` ({connector.describe()}) cannot "
                          "report changes since a timestamp, so it cannot be synced incrementally")
    since = stored - timedelta(seconds=spec.overlap_seconds) if stored else None
    result = EntityChanges(since=since, watermark=stored)
    source = open_changes(entity, since)
    steps.check_source_schema(ctx.mapping, entity, source, connector.describe())
    ctx.staging.create_rows_table(entity)
    columns = list(dict.fromkeys([*entity.source_columns, spec.watermark,
                                  *([spec.deleted_flag] if spec.deleted_flag else [])]))
    seq = 0
    try:
        for batch_no, batch in enumerate(source.read(columns, ctx.mapping.batch_size)):
            result.read += len(batch.frame)
            newest = _newest(batch.frame[spec.watermark], ctx.mapping.timezone_for(entity, spec.watermark))
            if newest is not None and (result.watermark is None or newest > result.watermark):
                result.watermark = newest
            live = batch
            if spec.deleted_flag:
                gone = _truthy(batch.frame[spec.deleted_flag])
                if gone.any():
                    keys = source_keys(batch.frame[gone].reset_index(drop=True), entity.key)
                    result.deleted += external_ids(entity.source, entity.name,
                                                   [k for k in keys.tolist() if isinstance(k, str)])
                    live = SourceBatch(batch.frame[~gone].reset_index(drop=True), batch.row_numbers[~gone],
                                       batch.rejected)
            seq += stage_batch_task(Opaque(ctx), entity, batch_no, seq, Opaque(live))
    finally:
        source.close()
    dedupe_task(Opaque(ctx), entity)
    return result


def _newest(values: pd.Series, zone: str | None) -> datetime | None:
    stamps = pd.to_datetime(values, errors="coerce", utc=False)
    if stamps.dt.tz is None:
        stamps = stamps.dt.tz_localize(zone or "UTC")
    newest = stamps.max()
    return None if pd.isna(newest) else newest.tz_convert("UTC").to_pydatetime()


def _truthy(values: pd.Series) -> np.ndarray:
    return values.map(lambda v: v is True or (isinstance(v, (int, np.integer)) and v == 1)
                      or (isinstance(v, str) and v.strip().lower() in _TRUE)).to_numpy(dtype=bool)


# --- deletes and conflicts -----------------------------------------------------------------------------


def apply_deletes(ctx: steps.RunContext, entity: Entity, deleted: list[str]) -> int:
    """Propagate tombstones by the entity's policy; returns how many target records it deleted/deactivated."""
    assert entity.sync is not None
    policy = entity.sync.deletes
    if policy == "ignore" or not deleted:
        return 0
    target = ctx.target(entity.target)
    present = target.fetch_existing(entity, deleted)
    if policy == "delete":
        remove = getattr(target, "delete", None)
        if remove is None:
            raise TargetError(f"entity `{entity.name}`: target `{entity.target}` cannot delete records; use "
                              "`deletes: deactivate` or `ignore`")
        failures = remove(entity, [RestoreRow(ext, row.target_key, {}) for ext, row in present.items()])
        count = len(present)
    else:  # deactivate: only records still active, so a re-read tombstone changes nothing
        active = entity.sync.active_field
        assert active is not None
        # Whole records (as the target holds them) with the flag cleared: some targets write every field.
        rows = [{entity.external_id_column: ext, **{f: row.values.get(f) for f in entity.fields}, active: False}
                for ext, row in present.items() if row.values.get(active) is not False]
        failures = target.write(entity, rows) if rows else []
        count = len(rows)
    if failures:
        raise TargetError(f"entity `{entity.name}`: target `{entity.target}` refused {len(failures)} of "
                          f"{count} {policy}s (first: {failures[0].reason}, {failures[0].detail})")
    return count


def apply_conflict_policy(ctx: steps.RunContext, entity: Entity) -> int:
    """Before loading, keep target values where the policy says the target wins; returns rows touched.

    The staged values are replaced with the target's, so the load then sees those fields (or rows) as
    unchanged and the reconciliation still balances.
    """
    assert entity.sync is not None
    spec = entity.sync
    if spec.conflicts == "source_wins":
        return 0
    table = table_name(entity)
    con = ctx.staging.con
    modified = spec.modified_field
    keep_fields = list(spec.target_fields) if spec.conflicts == "fields" else list(entity.fields)
    kept = 0
    last = ctx.staging.max_seq(entity)
    for first in range(0, last + 1, ctx.mapping.batch_size):
        wanted = [*keep_fields, *([modified] if modified and modified not in keep_fields else [])]
        cols = ", ".join(f'"{c}"' for c in wanted)
        staged = con.execute(f'SELECT _ext, {cols} FROM "{table}" WHERE _seq BETWEEN ? AND ?',
                             [first, first + ctx.mapping.batch_size - 1]).df()
        if staged.empty:
            continue
        existing = ctx.target(entity.target).fetch_existing(entity, staged["_ext"].tolist())
        rows = []
        for ext, source_modified in zip(staged["_ext"], staged[modified] if modified else staged["_ext"],
                                        strict=True):
            current = existing.get(ext)
            if current is None:
                continue
            if spec.conflicts == "newest_wins":
                target_modified = current.values.get(modified)
                if target_modified is None or pd.isna(source_modified) or \
                        _utc(target_modified) <= _utc(source_modified):
                    continue
            rows.append({"_ext": ext, **{f: current.values.get(f) for f in keep_fields}})
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        for name in keep_fields:  # the staged column's type, so DuckDB casts the target's values back
            if entity.fields[name].type == "timestamp":
                frame[name] = pd.to_datetime(frame[name].map(_utc), utc=True)
        con.register("kept_frame", frame)
        try:
            assignments = ", ".join(f'"{f}" = k."{f}"' for f in keep_fields)
            con.execute(f'UPDATE "{table}" SET {assignments} FROM kept_frame k WHERE "{table}"._ext = k._ext')
        finally:
            con.unregister("kept_frame")
        kept += len(rows)
    return kept


def _utc(value: Any) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


# --- helpers -------------------------------------------------------------------------------------------


def notify(webhook: str | None, payload: dict[str, Any]) -> None:
    """POST a JSON notification; a webhook that is down is logged, never raised over the real failure."""
    if not webhook:
        return
    request = urllib.request.Request(webhook, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except OSError as error:
        log.warning("failure webhook not reached (%s)", type(error).__name__)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except Exception:  # called outside a flow run (tests of run_cycle)
        return log


def _reason_code(error: BaseException) -> str:
    """`SourceError` -> `source_error`: the audit trail takes reason codes, never message text."""
    import re

    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _now() -> str:
    return datetime.now(UTC).isoformat()


def start_sync(mapping_path: str | Path, webhook: str | None = None) -> dict[str, Any]:
    """Run one cycle as a Prefect flow run (the CLI's `crmbridge sync`)."""
    return sync_flow(str(Path(mapping_path).resolve()), webhook)
