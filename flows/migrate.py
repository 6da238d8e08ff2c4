"""The `migrate` Prefect flow: per entity in dependency order, extract -> cleanse -> validate -> protect ->
stage -> dedupe -> load -> reconcile. Tasks are per batch, never per row."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import get_run_context

from crmbridge import failpoints
from crmbridge.audit import AuditTrail
from crmbridge.checkpoints import SETTLED, STAGED, Checkpoints
from crmbridge.errors import CrmbridgeError, ReconciliationError
from crmbridge.flows import steps
from crmbridge.flows.progress import NoProgress, Progress
from crmbridge.flows.reconcile import unbalanced_message
from crmbridge.mappings import load_mapping
from crmbridge.mappings.envvars import Redactor
from crmbridge.runs import Manifest, RunDir, runs_root
from crmbridge.staging import Staging

log = logging.getLogger("crmbridge.run")

# The CLI installs its progress bars here; a flow started by a Prefect worker reports nothing extra.
progress_reporter: Progress = NoProgress()


@task(name="stage-batch", cache_policy=NONE, task_run_name="stage-{entity.name}-{batch_no}")
def stage_batch_task(ctx: steps.RunContext, entity, batch_no: int, first_seq: int, batch) -> int:
    return steps.process_batch(ctx, entity, batch_no, first_seq, batch)


@task(name="dedupe", cache_policy=NONE, task_run_name="dedupe-{entity.name}")
def dedupe_task(ctx: steps.RunContext, entity) -> None:
    steps.after_staging(ctx, entity)
    steps.dedupe(ctx, entity)


@task(name="load-batch", cache_policy=NONE, task_run_name="load-{entity.name}-{first_seq}")
def load_batch_task(ctx: steps.RunContext, entity, first_seq: int, last_seq: int) -> dict[str, int]:
    return steps.load_batch(ctx, entity, first_seq, last_seq)


def _now() -> str:
    return datetime.now(UTC).isoformat()


@flow(name="crmbridge-migrate", flow_run_name="{run_id}", validate_parameters=False)
def migrate_flow(mapping_path: str, run_id: str, state_dir: str, dry_run: bool = False,
                 resuming: bool = False) -> dict[str, Any]:
    mapping = load_mapping(mapping_path)
    run = RunDir(runs_root(Path(state_dir)) / run_id)
    manifest = run.manifest()
    try:
        manifest.flow_run_id = str(get_run_context().flow_run.id)
    except Exception:  # outside a flow run context (never in practice); the id is informational
        manifest.flow_run_id = None
    run.write_manifest(manifest)
    staging = Staging(run.staging_path)
    audit = AuditTrail(run.path / "events.jsonl", run_id, mapping.name, mapping.sha256, manifest.operator)
    ctx = steps.RunContext(mapping, run, staging, audit, dry_run, progress_reporter, Checkpoints(staging))
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
            ctx.target(entity.target).prepare(entity, ctx.dry_run)
        for entity in order:
            _load_entity(ctx, entity, manifest)
        failpoints.reach("reconcile.before")
        results = steps.reconcile(ctx)
        reconciliation = {"run_id": run_id, "dry_run": dry_run, "entities": [r.as_dict() for r in results]}
        run.write_reconciliation(reconciliation)
        problem = unbalanced_message(results)
        if problem:
            raise ReconciliationError(problem)
        manifest.status = "succeeded"
        audit.append("run_finished", outcome="succeeded",
                     totals={r.entity: r.as_dict() for r in results})
        return reconciliation
    except BaseException as error:
        manifest.status = "failed"
        manifest.error = redact(str(error)) if isinstance(error, CrmbridgeError) else type(error).__name__
        audit.append("run_finished", outcome="failed", reason=type(error).__name__)
        logger.error("run %s failed: %s", run_id, manifest.error)
        # The traceback's frames hold the staging connection; Prefect keeps the exception in the flow
        # state until exit, so drop those locals now rather than leak the DuckDB handles.
        traceback.clear_frames(error.__traceback__)
        raise
    finally:
        manifest.finished_at = _now()
        run.write_manifest(manifest)
        ctx.close()
        staging.close()


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
    seq = 0
    try:
        for batch_no, batch in enumerate(source.read(entity.source_columns, ctx.mapping.batch_size)):
            seq += stage_batch_task(ctx, entity, batch_no, seq, batch)
            failpoints.reach("stage.after_batch")
    finally:
        source.close()
    checkpoints.mark_done(entity.name, STAGED)
    ctx.progress.done(entity.name, "extract")
    state["extract"] = "done"
    ctx.run.write_manifest(manifest)
    failpoints.reach("stage.after_entity")
    _settle_entity(ctx, entity, state)


def _settle_entity(ctx: steps.RunContext, entity, state: dict[str, Any]) -> None:
    dedupe_task(ctx, entity)
    assert ctx.checkpoints is not None
    ctx.checkpoints.mark_done(entity.name, SETTLED)
    state["dedupe"] = "done"
    failpoints.reach("dedupe.after")


def _load_entity(ctx: steps.RunContext, entity, manifest: Manifest) -> None:
    state: dict[str, Any] = manifest.entities.setdefault(entity.name, {})
    loaded = ctx.checkpoints.loaded(entity.name) if ctx.checkpoints is not None else set()
    ranges = [(first, last) for first, last in steps.load_ranges(ctx, entity) if first not in loaded]
    ctx.progress.stage(entity.name, "load", sum(b - a + 1 for a, b in ranges))
    for first, last in ranges:
        load_batch_task(ctx, entity, first, last)
    ctx.progress.done(entity.name, "load")
    state["load"] = "done" if not ctx.dry_run else "planned"
    ctx.run.write_manifest(manifest)


def start_run(mapping_path: str | Path, dry_run: bool = False, run_id: str | None = None) -> tuple[RunDir, dict]:
    """Create the run directory and manifest, then run the flow. Returns the run and its reconciliation."""
    from crmbridge.runs import create_run

    mapping = load_mapping(mapping_path)
    run = create_run(mapping.state_dir, run_id)
    manifest = Manifest(run_id=run.run_id, mapping_name=mapping.name, mapping_path=str(mapping.path),
                        mapping_sha256=mapping.sha256, dry_run=dry_run, started_at=_now())
    run.write_manifest(manifest)
    with _run_log(run):
        result = migrate_flow(str(mapping.path), run.run_id, str(mapping.state_dir), dry_run)
    return run, result


def resume_run(run: RunDir) -> dict:
    """Carry on a failed or killed run from its checkpoints (see crmbridge.checkpoints).

    Staged entities are not extracted again and loaded batches are not loaded again. The mapping must be the
    one the run started with: resuming under another would mix two mappings' rows in one ledger."""
    manifest = run.manifest()
    if manifest.status == "succeeded":
        raise CrmbridgeError(f"run {run.run_id} succeeded; there is nothing to resume")
    mapping = load_mapping(manifest.mapping_path)
    if mapping.sha256 != manifest.mapping_sha256:
        raise CrmbridgeError(
            f"{mapping.path} changed since run {run.run_id} started (sha256 {manifest.mapping_sha256[:12]}, "
            f"now {mapping.sha256[:12]}); restore it to resume, or start a new run")
    manifest.status, manifest.error, manifest.finished_at = "running", None, None
    manifest.resumed = [*manifest.resumed, _now()]
    run.write_manifest(manifest)
    with _run_log(run):
        return migrate_flow(str(mapping.path), run.run_id, str(mapping.state_dir), manifest.dry_run, resuming=True)


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
