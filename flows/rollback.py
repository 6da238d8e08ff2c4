"""Roll a run back: undo, in the target, what the run wrote, from the run's own ledger.

Per written record the ledger holds what undoing it needs: a created record's target key, an updated record's
before-image of exactly the fields the run changed, a deleted record's full before-image. The run's after-image
(what it wrote) is not stored again: it is the staged row, references resolved through the ledger, converted
exactly as the load converted it (`steps.written_values`), so keeping it costs the run nothing.

Each record gets one verdict by comparing the target as it is now with the after-image and the before-image:
  - the target still holds what the run wrote: undo it (delete / restore / re-create);
  - the target already holds the undone state (an earlier, interrupted rollback got there): nothing to do;
  - anything else: the record was changed in the target after the run. It is skipped and listed, unless
    `force` (then it is undone anyway; an updated record deleted since cannot be, and stays skipped).

Applied per entity in reverse dependency order (contacts before their accounts) and in batches. Every batch
journals its intent in the run's staging store before the target sees it and its outcomes after, so a rollback
killed at any point resumes where it stopped, ends in the same target state, and a second rollback does nothing.
Its reconciliation: deleted + restored + recreated + already undone + skipped + refused = what the run wrote.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pyarrow as pa

from crmbridge.audit.project import open_trail
from crmbridge.connectors import connector_for
from crmbridge.connectors.base import ExistingRow, RestoreRow, ReversibleTarget, Target
from crmbridge.errors import CrmbridgeError
from crmbridge.flows.steps import written_values
from crmbridge.mappings import load_mapping
from crmbridge.mappings.model import Entity, Mapping
from crmbridge.runs import RunDir, _write_json
from crmbridge.staging import Staging
from crmbridge.values import canonical, same_value

UNDO = {"created": "deleted", "updated": "restored", "deleted": "recreated"}  # the run's action -> its undo
DONE = ("deleted", "restored", "recreated", "already_undone")  # outcomes a later rollback leaves alone
OUTCOMES = (*DONE, "skipped", "refused")
ROLLBACK_JSON = "rollback.json"
PLAN_LISTED = 1_000  # records a plan lists per entity and kind

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollback_outcomes (
    entity VARCHAR, external_id VARCHAR, planned VARCHAR, outcome VARCHAR, fields VARCHAR[], reason VARCHAR,
    noted_at TIMESTAMPTZ DEFAULT now()
);
"""


class RollbackError(CrmbridgeError):
    """A run cannot be rolled back (a dry run, a changed mapping, a target without the capability, ...)."""


@dataclass
class Decision:
    """What the rollback does with one record the run wrote."""

    external_id: str
    target_key: Any
    action: str  # what the run did: created | updated | deleted
    verdict: str  # undo | already_undone | changed | missing
    fields: list[str] = field(default_factory=list)  # changed: the fields that differ; never values
    values: dict[str, Any] = field(default_factory=dict)  # undo of an update / delete: typed values to write

    @property
    def undo(self) -> str:
        return UNDO[self.action]


@dataclass
class Conflict:
    """A record changed in the target after the run (listed by keys and field names, never values)."""

    entity: str
    external_id: str
    target_key: Any
    action: str
    reason: str  # changed_after_run | deleted_after_run | no_after_image
    fields: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"entity": self.entity, "external_id": self.external_id, "target_key": _text(self.target_key),
                "action": self.action, "reason": self.reason, "fields": self.fields}


@dataclass
class RollbackReport:
    run_id: str
    dry_run: bool
    force: bool
    entities: dict[str, Counter] = field(default_factory=dict)  # entity -> outcome (or planned undo) -> count
    written: dict[str, int] = field(default_factory=dict)  # entity -> records the run wrote
    conflicts: list[Conflict] = field(default_factory=list)
    planned: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # dry run: entity -> undo -> key (id)
    refused: list[dict[str, str]] = field(default_factory=list)
    this_attempt: Counter = field(default_factory=Counter)  # outcomes decided by this call (0 on a second rollback)
    warnings: list[str] = field(default_factory=list)

    def counts(self, entity: str) -> Counter:
        return self.entities.setdefault(entity, Counter())

    @property
    def balanced(self) -> bool:
        return all(sum(self.counts(e)[o] for o in OUTCOMES) == n for e, n in self.written.items())

    def as_dict(self) -> dict[str, Any]:
        rows = []
        for entity, written in self.written.items():
            counts = self.counts(entity)
            row = {"entity": entity, "written": written, **{o: counts[o] for o in OUTCOMES}}
            row["accounted"] = sum(counts[o] for o in OUTCOMES)
            row["balanced"] = row["accounted"] == written
            rows.append(row)
        return {"run_id": self.run_id, "dry_run": self.dry_run, "force": self.force, "entities": rows,
                "conflicts": [c.as_dict() for c in self.conflicts], "refused": self.refused,
                "this_attempt": dict(self.this_attempt), "planned": self.planned, "warnings": self.warnings}


# --- canonical text back to typed values --------------------------------------------------------------------


def from_canonical(text: str | None, kind: str) -> Any:
    """The value a before-image's canonical text (`values.canonical`) stands for, typed for writing."""
    if text is None:
        return None
    if kind == "integer":
        return int(text)
    if kind == "decimal":
        return Decimal(text)
    if kind == "float":
        return float(text)
    if kind == "boolean":
        return text == "true"
    if kind == "date":
        return dt.date.fromisoformat(text)
    if kind == "timestamp":  # canonical timestamps are naive UTC
        return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
    return text


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


# --- deciding -----------------------------------------------------------------------------------------------


def decide(entity: Entity, action: str, external_id: str, target_key: Any, changed: list[str],
           before_image: str | None, after: dict[str, Any] | None, current: ExistingRow | None,
           force: bool) -> Decision:
    """One record's verdict from the ledger entry, the run's after-image and the target's current row."""
    kinds = {name: spec.type for name, spec in entity.fields.items()}
    before = json.loads(before_image) if before_image else {}
    decision = Decision(external_id, target_key, action, "undo")

    def differs_from(image: dict[str, Any], names: list[str], as_text: bool) -> list[str]:
        assert current is not None
        if as_text:
            return [n for n in names if canonical(current.values.get(n), kinds[n]) != image.get(n)]
        return [n for n in names if not same_value(current.values.get(n), image.get(n), kinds[n])]

    if action == "deleted":  # undo: bring the record back as it was
        decision.values = {n: from_canonical(before.get(n), kinds[n]) for n in kinds if n in before}
        if current is None:
            return decision
        if not differs_from(before, list(before), as_text=True):
            decision.verdict = "already_undone"
            return decision
        decision.verdict, decision.fields = "changed", differs_from(before, list(before), as_text=True)
    elif current is None:  # a created record already gone is undone; an updated one cannot be restored
        decision.verdict = "already_undone" if action == "created" else "missing"
        return decision
    elif after is None:  # the staged row is gone: nothing to compare with, so never touched without force
        decision.verdict, decision.fields = "changed", []
    else:
        names = list(kinds)
        off_after = differs_from(after, names, as_text=False)
        if not off_after:
            if action == "updated":
                decision.values = {n: from_canonical(before.get(n), kinds[n]) for n in changed}
            return decision
        if action == "updated":
            restored = set(changed) - set(differs_from(before, changed, as_text=True))
            decision.fields = [n for n in off_after if n not in restored]
            if not decision.fields:
                decision.verdict = "already_undone"
                return decision
            decision.values = {n: from_canonical(before.get(n), kinds[n]) for n in changed}
        else:
            decision.fields = off_after
        decision.verdict = "changed"
    if force and decision.verdict == "changed":
        decision.verdict = "undo"
        if action == "updated" and not decision.values:
            decision.values = {n: from_canonical(before.get(n), kinds[n]) for n in changed}
    return decision


# --- the rollback --------------------------------------------------------------------------------------------


class Rollback:
    """Plan (`dry_run=True`) or apply the rollback of one finished run."""

    def __init__(self, run: RunDir, force: bool = False, dry_run: bool = False, batch_size: int | None = None):
        self.run, self.force, self.dry_run = run, force, dry_run
        self.manifest = run.manifest()
        if self.manifest.dry_run:
            raise RollbackError(f"run {run.run_id} was a dry run: it wrote nothing, so there is nothing to roll back")
        self.mapping = self._mapping()
        self.batch_size = batch_size or self.mapping.batch_size
        self.staging = Staging(run.staging_path)
        self.staging.con.execute(_SCHEMA)
        # The project's audit trail, under the run's id: the rollback is part of that run's history.
        self.audit = open_trail(self.mapping, run.run_id, self.manifest.operator) if not dry_run else None
        self._targets: dict[str, Target] = {}
        self._prepared: set[str] = set()
        self.report = RollbackReport(run.run_id, dry_run, force)
        if self.manifest.status != "succeeded":
            # A batch the target committed just before a crash may be missing from the ledger; resuming the run
            # records it (its journal knows the batch), so roll back after `crmbridge resume`.
            self.report.warnings.append(
                f"run {run.run_id} did not finish ({self.manifest.status}): records of a batch the target committed "
                f"just before it stopped may be missing from its ledger; run `crmbridge resume {run.run_id}` first "
                "to roll all of them back")

    def _mapping(self) -> Mapping:
        mapping = load_mapping(self.manifest.mapping_path)
        if mapping.sha256 != self.manifest.mapping_sha256:
            raise RollbackError(
                f"{mapping.path} changed since run {self.run.run_id} (sha256 {self.manifest.mapping_sha256[:12]}, "
                f"now {mapping.sha256[:12]}): the rollback needs the run's own mapping to know its entities and "
                "fields; restore that file (e.g. from version control) and roll back again")
        return mapping

    def close(self) -> None:
        for target in self._targets.values():
            target.close()
        self._targets.clear()
        self.staging.close()
        if self.audit is not None:
            self.audit.close()

    def target(self, entity: Entity) -> ReversibleTarget:
        if entity.target not in self._targets:
            connector = connector_for(self.mapping.targets[entity.target], self.mapping)
            target = connector.open_target()
            if not isinstance(target, ReversibleTarget):
                target.close()
                raise RollbackError(f"target `{entity.target}` ({connector.kind}) cannot roll back: its connector "
                                    "does not implement delete, restore and recreate")
            self._targets[entity.target] = target
        target = self._targets[entity.target]
        if entity.name not in self._prepared:
            target.prepare(entity, dry_run=True)  # registers the table; never creates or changes anything
            self._prepared.add(entity.name)
        return target  # type: ignore[return-value]

    # --- ledger paging ---

    def _written(self, entity: Entity) -> int:
        return self.staging.con.execute(
            "SELECT count(*) FROM ledger WHERE entity = ? AND action IN ('created', 'updated', 'deleted')",
            [entity.name]).fetchone()[0]

    def _pages(self, entity: Entity) -> Iterator[list[tuple]]:
        """Ledger entries still to undo (never decided, journalled but unfinished, skipped or refused before),
        by external id, one batch at a time; the last but one column is the undo an unfinished attempt journalled.

        A page is chosen on the narrow external-id column first, and only its rows are joined with the journal:
        staging's memory cap holds a batch, not a join of the whole ledger."""
        last = ""
        con = self.staging.con
        while True:
            page = [r[0] for r in con.execute(
                "SELECT external_id FROM ledger WHERE entity = ? AND action IN ('created', 'updated', 'deleted') "
                "AND external_id > ? ORDER BY external_id LIMIT ?", [entity.name, last, self.batch_size]).fetchall()]
            if not page:
                return
            last = page[-1]
            con.register("page_ids", pa.table({"ext": pa.array(page, pa.string())}))
            try:
                rows = con.execute("""
                    SELECT l.external_id, l.target_key, l.action, l.changed, l.before_image::VARCHAR,
                           CASE WHEN r.outcome IS NULL THEN r.planned END, l.source_key, r.outcome
                    FROM (SELECT * FROM ledger WHERE entity = ? AND external_id IN (SELECT ext FROM page_ids)) l
                    LEFT JOIN (SELECT * FROM rollback_outcomes
                               WHERE entity = ? AND external_id IN (SELECT ext FROM page_ids)) r
                      ON r.external_id = l.external_id
                    ORDER BY l.external_id""", [entity.name, entity.name]).fetchall()
            finally:
                con.unregister("page_ids")
            todo = [row[:7] for row in rows if row[7] is None or row[7] in ("skipped", "refused")]
            if todo:
                yield todo

    def _after_images(self, entity: Entity, external_ids: list[str],
                      current: dict[str, ExistingRow]) -> dict[str, dict[str, Any]]:
        """What the run wrote: the staged rows converted as the load converted them (protected fields as the
        target received them: decrypted for a plaintext target)."""
        table = self.staging.rows_for_external_ids_arrow(entity, external_ids)
        refs = {n: table.column(f"{n}__target") for n, spec in entity.fields.items() if spec.ref}
        columns = written_values(entity, table, refs)
        if self.mapping.protection is not None:
            from crmbridge.protection import load as protection_load

            protection_load.prepare(self.mapping, entity, table, columns, current)
        names = list(entity.fields)
        return {ext: dict(zip(names, values, strict=True))
                for ext, *values in zip(table.column("_ext").to_pylist(), *columns, strict=True)}

    def _unsealed(self, entity: Entity, rows: list[tuple]) -> list[tuple]:
        """For a target that takes plaintext, before-images keep protected fields encrypted (sealed by
        `protection.load.seal_before_images`); the target is compared with and restored to plaintext, so they are
        decrypted here, in memory only."""
        if self.mapping.protection is None:
            return rows
        from crmbridge.protection.mapping_rules import receives_plaintext
        from crmbridge.protection.policy import ENCRYPTED, protector_for

        sealed = [n for n, spec in entity.fields.items() if getattr(spec, "protect", "none") in ENCRYPTED]
        protector = protector_for(self.mapping)
        if not sealed or protector is None or not receives_plaintext(self.mapping, entity.target):
            return rows
        opened = []
        for row in rows:
            image = json.loads(row[4]) if row[4] else None
            if image and any(image.get(n) is not None for n in sealed):
                for name in (n for n in sealed if image.get(n) is not None):
                    image[name] = protector.decrypt_value(entity.name, name, image[name], row[0])
                row = (*row[:4], json.dumps(image), *row[5:])
            opened.append(row)
        return opened

    # --- one batch ---

    def batch(self, entity: Entity, rows: list[tuple]) -> Counter:
        """Decide, journal, apply and record one batch of ledger entries; returns its outcome counts."""
        target = self.target(entity)
        exts = [r[0] for r in rows]
        current = target.fetch_existing(entity, exts)
        after = self._after_images(entity, exts, current)
        rows = self._unsealed(entity, rows)
        decisions = [decide(entity, action, ext, key, list(changed or []), image, after.get(ext), current.get(ext),
                            self.force) for ext, key, action, changed, image, _, _ in rows]
        journalled = {r[0]: r[5] for r in rows if r[5]}
        counts: Counter = Counter()
        if self.dry_run:
            for d in decisions:
                self._note(entity, d, counts, journalled)
            return counts
        undo = [d for d in decisions if d.verdict == "undo"]
        self._journal(entity, undo)
        failed = self._apply(entity, target, undo)
        outcomes = []
        for d in decisions:
            outcome = self._note(entity, d, counts, journalled, failed)
            outcomes.append((d.external_id, journalled.get(d.external_id) or (d.undo if d.verdict == "undo" else None),
                             outcome, d.fields, failed.get(d.external_id)))
        self._record(entity, outcomes)
        assert self.audit is not None
        self.audit.append("rollback_batch", entity=entity.name, details=dict(counts))
        self.audit.records("record_rolled_back", entity.name, [r[6] for r in rows],
                           target_ids=[d.target_key for d in decisions], reasons=[o[2] for o in outcomes],
                           fields=[d.fields or list(d.values) or None for d in decisions])
        return counts

    def _note(self, entity: Entity, d: Decision, counts: Counter, journalled: dict[str, str],
              failed: dict[str, str] | None = None) -> str:
        if d.verdict == "undo":
            outcome = "refused" if failed and d.external_id in failed else d.undo
            listed = self.report.planned.setdefault(entity.name, {}).setdefault(d.undo, []) if self.dry_run else None
            if listed is not None and len(listed) < PLAN_LISTED:  # the counts are complete; the listing is a sample
                listed.append(f"{_text(d.target_key)} ({d.external_id})")
        elif d.verdict == "already_undone":  # an interrupted rollback's journalled undo reached the target
            outcome = journalled.get(d.external_id) or "already_undone"
        else:
            outcome = "skipped"
            reason = "deleted_after_run" if d.verdict == "missing" else (
                "changed_after_run" if d.fields or d.action == "deleted" else "no_after_image")
            self.report.conflicts.append(Conflict(entity.name, d.external_id, d.target_key, d.action, reason,
                                                  d.fields))
        counts[outcome] += 1
        self.report.this_attempt[outcome] += 1
        if outcome == "refused" and failed:
            self.report.refused.append({"entity": entity.name, "external_id": d.external_id,
                                        "detail": failed[d.external_id]})
        return outcome

    def _journal(self, entity: Entity, undo: list[Decision]) -> None:
        """Write the intent before the target changes: a resumed rollback then knows what it was doing."""
        if not undo:
            return
        self._replace(entity, [(d.external_id, d.undo, None, d.fields, None) for d in undo])

    def _record(self, entity: Entity, outcomes: list[tuple]) -> None:
        self._replace(entity, outcomes)

    def _replace(self, entity: Entity, rows: list[tuple]) -> None:
        frame = pa.table({
            "external_id": pa.array([r[0] for r in rows], pa.string()),
            "planned": pa.array([r[1] for r in rows], pa.string()),
            "outcome": pa.array([r[2] for r in rows], pa.string()),
            "fields": pa.array([list(r[3]) for r in rows], pa.list_(pa.string())),
            "reason": pa.array([r[4] for r in rows], pa.string()),
        })
        con = self.staging.con
        con.register("outcome_frame", frame)
        con.begin()
        try:
            con.execute("DELETE FROM rollback_outcomes WHERE entity = ? AND external_id IN "
                        "(SELECT external_id FROM outcome_frame)", [entity.name])
            con.execute("INSERT INTO rollback_outcomes (entity, external_id, planned, outcome, fields, reason) "
                        "SELECT ?, external_id, planned, outcome, fields, reason FROM outcome_frame", [entity.name])
            con.commit()
        except BaseException:
            con.rollback()
            raise
        finally:
            con.unregister("outcome_frame")

    def _apply(self, entity: Entity, target: ReversibleTarget, undo: list[Decision]) -> dict[str, str]:
        failures = []
        by_kind = {kind: [RestoreRow(d.external_id, d.target_key, d.values) for d in undo if d.undo == kind]
                   for kind in ("deleted", "restored", "recreated")}
        failures += target.delete(entity, by_kind["deleted"]) if by_kind["deleted"] else []
        failures += target.restore(entity, by_kind["restored"]) if by_kind["restored"] else []
        failures += target.recreate(entity, by_kind["recreated"]) if by_kind["recreated"] else []
        return {f.external_id: f.detail for f in failures}

    # --- the whole run ---

    def entities(self) -> list[Entity]:
        """Entities in reverse dependency order: children before the parents they point at."""
        return list(reversed(self.mapping.load_order()))

    def execute(self, run_batch: Callable[[Rollback, Entity, list[tuple]], Counter] | None = None) -> RollbackReport:
        """Plan or apply every entity; `run_batch` lets the Prefect flow run each batch as a task."""
        run_batch = run_batch or (lambda rollback, entity, rows: rollback.batch(entity, rows))
        if self.audit is not None:
            self.audit.append("rollback_started", entities=[e.name for e in self.entities()],
                              details={"force": self.force})
        try:
            for entity in self.entities():
                self.report.written[entity.name] = self._written(entity)
                for rows in self._pages(entity):
                    counts = run_batch(self, entity, rows)
                    if self.dry_run:
                        self.report.counts(entity.name).update(counts)
                self._count_earlier(entity)
        except BaseException as error:
            if self.audit is not None:
                self.audit.append("rollback_finished", outcome="failed", reason=type(error).__name__)
            raise
        if self.audit is not None:
            _write_json(self.run.path / ROLLBACK_JSON, self.report.as_dict())
            self.audit.append("rollback_finished", outcome="succeeded" if self.report.balanced else "failed",
                              totals={e: dict(c) for e, c in self.report.entities.items()},
                              details={"balanced": self.report.balanced, "this_attempt": dict(self.report.this_attempt),
                                       "skipped": sum(c["skipped"] for c in self.report.entities.values())})
            self.audit.checkpoint()
        return self.report

    def _count_earlier(self, entity: Entity) -> None:
        """Applied: the counts are what the journal now holds (this attempt plus earlier ones). Dry run: add what
        earlier rollbacks already finished to the plan's counts."""
        rows = self.staging.con.execute(
            "SELECT outcome, count(*) FROM rollback_outcomes WHERE entity = ? AND outcome IS NOT NULL "
            + ("AND outcome IN ('deleted', 'restored', 'recreated', 'already_undone') " if self.dry_run else "")
            + "GROUP BY outcome", [entity.name]).fetchall()
        counts = self.report.counts(entity.name)
        if not self.dry_run:
            counts.clear()
        for outcome, n in rows:  # for a plan, whatever an earlier rollback did is already undone
            counts["already_undone" if self.dry_run else outcome] += n


def plan_rollback(run: RunDir, force: bool = False, batch_size: int | None = None) -> RollbackReport:
    """What `rollback` would do, without touching the target or the rollback journal."""
    rollback = Rollback(run, force=force, dry_run=True, batch_size=batch_size)
    try:
        return rollback.execute()
    finally:
        rollback.close()


def apply_rollback(run: RunDir, force: bool = False, batch_size: int | None = None,
                   run_batch: Callable[[Rollback, Entity, list[tuple]], Counter] | None = None) -> RollbackReport:
    """Roll the run back (resuming an interrupted rollback); a second call finds nothing left to do."""
    rollback = Rollback(run, force=force, dry_run=False, batch_size=batch_size)
    try:
        return rollback.execute(run_batch)
    finally:
        rollback.close()


# --- as a Prefect flow (what `crmbridge rollback` runs) --------------------------------------------------------


def rollback_flow(run: RunDir, force: bool = False, batch_size: int | None = None) -> dict[str, Any]:
    """Apply the rollback as the Prefect flow `crmbridge-rollback`, one task per batch, so it shows in Prefect
    next to the run it undoes."""
    from prefect import flow, task
    from prefect.cache_policies import NONE

    @task(name="rollback-batch", cache_policy=NONE, task_run_name="rollback-{entity.name}")
    def rollback_batch(rollback: Rollback, entity: Entity, rows: list[tuple]) -> Counter:
        return rollback.batch(entity, rows)

    @flow(name="crmbridge-rollback", flow_run_name="rollback-{run_id}", validate_parameters=False)
    def crmbridge_rollback(run_id: str) -> dict[str, Any]:
        return apply_rollback(run, force, batch_size, run_batch=rollback_batch).as_dict()

    return crmbridge_rollback(run.run_id)
