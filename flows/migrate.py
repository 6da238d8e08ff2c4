"""The `migrate` Prefect flow: per entity in dependency order, extract -> cleanse -> validate -> protect ->
stage -> dedupe -> load -> reconcile. Tasks are per batch, never per row."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import get_run_context
from prefect.futures import PrefectFuture

from crmbridge import failpoints
from crmbridge.audit.project import open_trail
from crmbridge.checkpoints import SETTLED, STAGED, Checkpoints
from crmbridge.errors import CrmbridgeError, ReconciliationError
from crmbridge.flows import progress, steps
from crmbridge.flows.reconcile import unbalanced_message
from crmbridge.mappings import load_mapping
from crmbridge.mappings.envvars import Redactor
from crmbridge.runs import Manifest, RunDir, runs_root
from crmbridge.staging import Staging

log = logging.getLogger("crmbridge.run")

IN_FLIGHT = 4  # batches prepared (or written) on workers at once, beyond the one being staged (or recorded)


class Opaque:
    """A task parameter Prefect passes along without looking inside. It visits every element of a list, tuple,
    dict or dataclass parameter looking for futures: 9 s per 50,000-row write job on a Dask worker, against
    0.4 s for the write itself (Prefect's own `quote` is not unwrapped on Dask workers)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value


def _in_order(items: Iterable[Any], submit: Callable[[Any], PrefectFuture | None],
              limit: int = IN_FLIGHT) -> Iterator[tuple[Any, Any]]:
    """Submit a task per item with at most `limit` others still running (memory stays a few batches), and
    yield (item, result) in submission order. `limit=0`: one at a time, though the next item is produced
    (e.g. planned) while the previous one runs. A `submit` returning None has nothing to run: result None."""
    in_flight: deque[tuple[Any, PrefectFuture | None]] = deque()

    def oldest() -> tuple[Any, Any]:
        item, future = in_flight.popleft()
        return item, None if future is None else future.result(raise_on_failure=True)

    for item in items:
        while len(in_flight) > limit:
            yield oldest()
        in_flight.append((item, submit(item)))
    while in_flight:
        yield oldest()


@task(name="stage-batch", cache_policy=NONE, task_run_name="stage-{entity.name}-{batch_no}")
def stage_batch_task(ctx: Opaque, entity, batch_no: int, first_seq: int, batch: Opaque) -> int:
    return steps.process_batch(ctx.value, entity, batch_no, first_seq, batch.value)


@task(name="prepare-batch", cache_policy=NONE, task_run_name="prepare-{entity.name}-{batch_no}")
def prepare_batch_task(mapping: Opaque, entity, batch_no: int, batch: Opaque) -> steps.PreparedBatch:
    """Cleanse, validate and protect one batch where the task runner puts it (a Dask worker)."""
    return steps.prepare_batch(mapping.value, entity, batch.value)


@task(name="dedupe", cache_policy=NONE, task_run_name="dedupe-{entity.name}")
def dedupe_task(ctx: Opaque, entity) -> None:
    steps.after_staging(ctx.value, entity)
    steps.dedupe(ctx.value, entity)


@task(name="dedupe-part", cache_policy=NONE, task_run_name="dedupe-part-{number}")
def dedupe_part_task(spec: Opaque, job: Opaque, number: int):
    """Candidate pairs of whole blocks of one blocking rule, and their comparisons (a Dask worker)."""
    from crmbridge.dedupe.partition import compare_part

    return compare_part(spec.value, job.value)


def _dedupe_on_workers(spec, jobs: Iterable[Any]) -> list[Any]:
    """Dedupe's parts as tasks, a bounded number in flight (each holds its rows), results in job order."""
    def submit(numbered: tuple[int, Any]) -> PrefectFuture:
        number, job = numbered
        return dedupe_part_task.submit(Opaque(spec), Opaque(job), number)

    return [result for _, result in _in_order(enumerate(jobs), submit)]


@task(name="load-batch", cache_policy=NONE, task_run_name="load-{entity.name}-{first_seq}")
def load_batch_task(ctx: Opaque, entity, first_seq: int, last_seq: int) -> dict[str, int]:
    return steps.load_batch(ctx.value, entity, first_seq, last_seq)


@task(name="write-batch", cache_policy=NONE, task_run_name="write-{entity.name}-{first_seq}")
def write_batch_task(mapping: Opaque, entity, first_seq: int, job: Opaque) -> steps.WriteResult:
    """Upsert one planned batch where the task runner puts it (a Dask worker), on the worker's own target
    connection; the flow journals the plan before and records the ledger after."""
    return steps.write_batch(mapping.value, steps.worker_target(mapping.value, entity), entity, job.value)


def _now() -> str:
    return datetime.now(UTC).isoformat()


@flow(name="crmbridge-migrate", flow_run_name="{run_id}", validate_parameters=False)
def migrate_flow(mapping_path: str, run_id: str, state_dir: str, dry_run: bool = False,
                 resuming: bool = False, distributed: bool = False) -> dict[str, Any]:
    mapping = load_mapping(mapping_path)
    run = RunDir(runs_root(Path(state_dir)) / run_id)
    manifest = run.manifest()
    try:
        manifest.flow_run_id = str(get_run_context().flow_run.id)
    except Exception:  # outside a flow run context (never in practice); the id is informational
        manifest.flow_run_id = None
    staging = Staging(run.staging_path)
    manifest.staging_opened = True  # from now on the run's progress lives in the staging store
    run.write_manifest(manifest)
    audit = open_trail(mapping, run_id, manifest.operator)  # the project's store (settings.audit)
    if not dry_run:  # a dry run records no record-level events
        audit.start_writer()  # it boots while the sources are read
    ctx = steps.RunContext(mapping, run, staging, audit, dry_run, progress.current(), Checkpoints(staging),
                           distributed=distributed, dedupe_jobs=_dedupe_on_workers if distributed else None)
    redact = Redactor(mapping.secrets)
    logger = get_run_logger()
    audit.append("run_resumed" if resuming else "run_started", dry_run=dry_run,
                 entities=[e.name for e in mapping.load_order()])
    try:
        order = mapping.load_order()
        # Stage every entity before loading any: a bad source fails the run before the target changes.
        for entity in order:
            _stage_entity(ctx, entity, manifest)
        for entity in order:  # every target table checked (or created) before the first write
            _bulk_load(ctx, entity).prepare(entity, ctx.dry_run)
        for entity in order:
            _load_entity(ctx, entity, manifest)
        failpoints.reach("reconcile.before")
        if not run.staging_path.exists():  # an open file survives its deletion; the run's record would not
            raise CrmbridgeError(f"the staging store {run.staging_path} was deleted while the run was going; "
                                 "its ledger and quarantine are lost, so the run cannot be reconciled")
        results = steps.reconcile(ctx)
        reconciliation = {"run_id": run_id, "dry_run": dry_run, "entities": [r.as_dict() for r in results]}
        if ctx.usage():  # API calls used per target (e.g. Salesforce), shown in the run report
            reconciliation["api_usage"] = ctx.usage()
        run.write_reconciliation(reconciliation)
        problem = unbalanced_message(results)
        if problem:
            raise ReconciliationError(problem)
        manifest.status = "succeeded"
        audit.append("run_finished", outcome="succeeded",
                     totals={r.entity: r.as_dict() for r in results})
        audit.checkpoint()  # signed: chain head and the Merkle root of this run's events
        return reconciliation
    except BaseException as error:
        manifest.status = "failed"
        storage = _storage_failure(run, error)
        manifest.error = (redact(str(error)) if isinstance(error, CrmbridgeError)
                          else storage or type(error).__name__)
        with contextlib.suppress(Exception):  # a failing audit store must not hide the run's own error
            audit.append("run_finished", outcome="failed", reason=type(error).__name__)
            audit.checkpoint()
        logger.error("run %s failed: %s", run_id, manifest.error)
        # The traceback's frames hold the staging connection; Prefect keeps the exception in the flow
        # state until exit, so drop those locals now rather than leak the DuckDB handles.
        traceback.clear_frames(error.__traceback__)
        if storage:
            raise CrmbridgeError(storage) from None
        raise
    finally:
        manifest.finished_at = _now()
        run.write_manifest(manifest)
        ctx.close()
        staging.close()
        with contextlib.suppress(Exception):  # flushed by the checkpoint already; never mask the run's error
            audit.close()


def _storage_failure(run: RunDir, error: BaseException) -> str | None:
    """A clear message for a full disk or an unwritable run directory (these messages name files, not
    values); None for any other error."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device holding {error.filename or run.path}; free some and "
                f"`crmbridge resume {run.run_id}`")
    if isinstance(error, OSError) and error.filename:  # a file of the run (not a network error)
        return f"cannot write {error.filename}: {error.strerror or type(error).__name__}"
    if isinstance(error, duckdb.IOException):
        hint = (f"; free some and `crmbridge resume {run.run_id}`" if "space left" in str(error) else "")
        return f"the staging store {run.staging_path} failed: {error}{hint}"
    return None


def _stage_entity(ctx: steps.RunContext, entity, manifest: Manifest) -> None:
    state: dict[str, Any] = manifest.entities.setdefault(entity.name, {})
    checkpoints = ctx.checkpoints
    assert checkpoints is not None
    if checkpoints.done(entity.name, STAGED):
        if not checkpoints.done(entity.name, SETTLED):
            _settle_entity(ctx, entity, state)
        return  # staged by an earlier attempt of this run: never extracted twice
    checkpoints.reset_entity(entity.name, entity)  # an attempt that died halfway starts the entity again
    connector = ctx.connector(entity.source, "source")
    source = connector.open_source(entity)
    ctx.progress.stage(entity.name, "extract")
    steps.check_source_schema(ctx.mapping, entity, source, connector.describe())
    ctx.staging.create_rows_table(entity)
    try:
        batches = source.read(entity.source_columns, ctx.mapping.batch_size)
        (_stage_on_workers if ctx.distributed else _stage_here)(ctx, entity, batches)
    finally:
        source.close()
    checkpoints.mark_done(entity.name, STAGED)
    ctx.progress.done(entity.name, "extract")
    state["extract"] = "done"
    ctx.run.write_manifest(manifest)
    failpoints.reach("stage.after_entity")
    _settle_entity(ctx, entity, state)


def _stage_here(ctx: steps.RunContext, entity, batches: Iterable[Any]) -> None:
    seq = 0
    for batch_no, batch in enumerate(batches):
        seq += stage_batch_task(Opaque(ctx), entity, batch_no, seq, Opaque(batch))
        failpoints.reach("stage.after_batch")


def _stage_on_workers(ctx: steps.RunContext, entity, batches: Iterable[Any]) -> None:
    """Batches are prepared on the task runner's workers, a bounded number at a time (memory stays a few
    batches), and staged here in source order, so the staging store is the one a single process builds."""
    def submit(numbered: tuple[int, Any]) -> PrefectFuture:
        batch_no, batch = numbered
        return prepare_batch_task.submit(Opaque(ctx.mapping), entity, batch_no, Opaque(batch))

    seq = 0
    for (batch_no, _), prepared in _in_order(enumerate(batches), submit):
        seq += steps.stage_prepared(ctx, entity, batch_no, seq, prepared)
        failpoints.reach("stage.after_batch")


def _settle_entity(ctx: steps.RunContext, entity, state: dict[str, Any]) -> None:
    if ctx.distributed:
        # The task's function, called in the flow: its dedupe-part tasks go to the workers from here (a task
        # that submits tasks ships its own parameters along, and this one's include the staging connection).
        dedupe_task.fn(Opaque(ctx), entity)
    else:
        dedupe_task(Opaque(ctx), entity)
    assert ctx.checkpoints is not None
    ctx.checkpoints.mark_done(entity.name, SETTLED)
    state["dedupe"] = "done"
    failpoints.reach("dedupe.after")


def _bulk_load(ctx: steps.RunContext, entity) -> Any:
    """The entity's target, told that this run loads in bulk (a table it creates is indexed after its load;
    `SqlTarget.bulk_load`). Not with writes on a cluster's workers: each has a connection of its own."""
    target = ctx.target(entity.target)
    if not hasattr(target, "bulk_load"):
        return target
    assert ctx.checkpoints is not None
    checkpoints = ctx.checkpoints
    if checkpoints.index_deferred(entity.name):  # however this attempt runs, a killed one's index comes first
        target.complete_deferred.add(entity.name)
    if not ctx.distributed:
        target.bulk_load = True
        target.before_deferring = lambda deferred: checkpoints.note_index_deferred(deferred.name)
    return target


def _load_entity(ctx: steps.RunContext, entity, manifest: Manifest) -> None:
    state: dict[str, Any] = manifest.entities.setdefault(entity.name, {})
    loaded = ctx.checkpoints.loaded(entity.name) if ctx.checkpoints is not None else set()
    ranges = [(first, last) for first, last in steps.load_ranges(ctx, entity) if first not in loaded]
    ctx.progress.stage(entity.name, "load", sum(b - a + 1 for a, b in ranges))
    if ctx.distributed and not ctx.dry_run:
        _load_on_workers(ctx, entity, ranges)
    else:
        for first, last in ranges:
            load_batch_task(Opaque(ctx), entity, first, last)
    finish = getattr(ctx.target(entity.target), "finish", None)
    if finish is not None and not ctx.dry_run:
        finish(entity)  # e.g. the external-id index of a table created for this run
    steps.after_load(ctx, entity)
    ctx.progress.done(entity.name, "load")
    state["load"] = "done" if not ctx.dry_run else "planned"
    ctx.run.write_manifest(manifest)


def _load_on_workers(ctx: steps.RunContext, entity, ranges: list[tuple[int, int]]) -> None:
    """Batches are planned here (compared with the target, journalled), written by the task runner's
    workers, a bounded number at a time, and recorded here in batch order: the ledger is the one a single
    process writes. A batch in flight when the run dies is journalled, so resume settles it like any other.
    Rows of different batches have different external ids, so a batch's plan never depends on a write that
    is still in flight. A target that numbers its rows itself gets one write at a time, in batch order, so
    it numbers them as a single process would; so does one that takes one writer at a time (a SQLite file),
    where parallel writers would only queue on its lock."""
    target = ctx.target(entity.target)
    one_at_a_time = (entity.target_key_column != entity.external_id_column
                     or not getattr(target, "concurrent_writes", True))

    def plans() -> Iterator[steps.LoadPlan]:
        for first, last in ranges:
            with steps.bulk_work():
                plan = steps.plan_load(ctx, entity, first, last)  # while earlier batches are being written
            yield plan

    def submit(plan: steps.LoadPlan) -> PrefectFuture | None:
        if plan.job is None:
            return None
        return write_batch_task.submit(Opaque(ctx.mapping), entity, plan.first_seq, Opaque(plan.job))

    for plan, written in _in_order(plans(), submit, 0 if one_at_a_time else IN_FLIGHT):
        with steps.bulk_work():
            steps.record_load(ctx, entity, plan, written if written is not None else steps.nothing_written(entity))


def start_run(mapping_path: str | Path, dry_run: bool = False, run_id: str | None = None,
              dask: str | None = None) -> tuple[RunDir, dict]:
    """Create the run directory and manifest, then run the flow. Returns the run and its reconciliation.

    `dask`: prepare batches, write them and compare dedupe candidates on a Dask cluster, `local` (one worker
    process per CPU), `local:N` or a scheduler address such as `tcp://10.0.0.5:8786` (docs/scale-out.md);
    default: the mapping's `settings.dask`, else one process."""
    from crmbridge.runs import create_run

    mapping = load_mapping(mapping_path)
    dask = dask or mapping.dask  # the CLI's option, else the mapping's `settings.dask`
    run = create_run(mapping.state_dir, run_id)
    manifest = Manifest(run_id=run.run_id, mapping_name=mapping.name, mapping_path=str(mapping.path),
                        mapping_sha256=mapping.sha256, dry_run=dry_run, started_at=_now())
    run.write_manifest(manifest)
    with _run_log(run), _api_for_workers(dask):
        result = _flow_for(dask)(str(mapping.path), run.run_id, str(mapping.state_dir), dry_run,
                                 distributed=dask is not None)
    return run, result


@contextlib.contextmanager
def _api_for_workers(dask: str | None) -> Iterator[None]:
    """Dask workers report their task runs to the flow's Prefect API, so it must be one they can reach: a
    temporary in-process server is not. Without a configured API, the persistent local server is used
    (and started: `crmbridge server stop` stops it)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if dask is None or get_current_settings().api.url:
        yield
        return
    from crmbridge.flows.prefect_env import start_server

    server = start_server()
    log.info("Dask workers report to the persistent local Prefect server %s", server.api_url)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def _flow_for(dask: str | None):
    """The flow, with a Dask task runner when asked for one."""
    if dask is None:
        return migrate_flow
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise CrmbridgeError("`--dask` needs prefect-dask: pip install 'crmbridge[dask]'") from None
    if dask == "local" or dask.startswith("local:"):
        workers = int(dask.partition(":")[2] or os.cpu_count() or 1)
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                                "processes": True, "dashboard_address": None})
    else:
        runner = DaskTaskRunner(address=dask)
    return migrate_flow.with_options(task_runner=runner)


def resume_run(run: RunDir, dask: str | None = None) -> dict:
    """Carry on a failed or killed run from its checkpoints (see crmbridge.checkpoints).

    Staged entities are not extracted again and loaded batches are not loaded again. The mapping must be the
    one the run started with: resuming under another would mix two mappings' rows in one ledger."""
    manifest = run.manifest()
    if manifest.status == "succeeded":
        raise CrmbridgeError(f"run {run.run_id} succeeded; there is nothing to resume")
    if manifest.staging_opened and not run.staging_path.exists():  # killed before opening it is fine
        raise CrmbridgeError(f"run {run.run_id} has no staging store ({run.staging_path} was deleted); it "
                             "cannot be resumed: start a new run (loads are idempotent upserts)")
    mapping = load_mapping(manifest.mapping_path)
    if mapping.sha256 != manifest.mapping_sha256:
        raise CrmbridgeError(
            f"{mapping.path} changed since run {run.run_id} started (sha256 {manifest.mapping_sha256[:12]}, "
            f"now {mapping.sha256[:12]}); restore it to resume, or start a new run")
    dask = dask or mapping.dask
    manifest.status, manifest.error, manifest.finished_at = "running", None, None
    manifest.resumed = [*manifest.resumed, _now()]
    run.write_manifest(manifest)
    with _run_log(run), _api_for_workers(dask):
        return _flow_for(dask)(str(mapping.path), run.run_id, str(mapping.state_dir), manifest.dry_run,
                               resuming=True, distributed=dask is not None)


@contextlib.contextmanager
def _run_log(run: RunDir) -> Iterator[None]:
    """crmbridge's own log lines go to the run's `run.log` while the flow runs."""
    handler = logging.FileHandler(run.log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("crmbridge")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


__all__ = ["asdict", "migrate_flow", "resume_run", "start_run"]
