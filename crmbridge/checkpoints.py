"""What a run has finished, kept in its staging store, so a killed or failed run resumes where it stopped.

Checkpoints, each written in the same DuckDB transaction as the work it marks:

- an entity is *staged* once every source batch is in staging (then it is never extracted again; an entity
  interrupted halfway is reset and extracted again from its start, since sources promise no stable order);
- an entity is *settled* once duplicate keys and matches are resolved;
- a load batch (a `_seq` range) is *loaded* once its ledger rows are in staging.

Between sending a batch to the target and writing its ledger a crash can happen. So before the write, the
batch's *plan* is journalled: which rows it creates, and the before-image of the rows it updates. Resuming
such a batch, the rows the crashed attempt already wrote look `unchanged`; the journal restores what the run
really did to them, which is what the reconciliation and a rollback need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from crmbridge.staging import Staging, table_name

_SCHEMA = """
CREATE TABLE IF NOT EXISTS load_done (entity VARCHAR, first_seq BIGINT, last_seq BIGINT);
CREATE TABLE IF NOT EXISTS load_journal (
    entity VARCHAR, first_seq BIGINT, all_created BOOLEAN, external_ids VARCHAR[], actions VARCHAR[],
    changed JSON, before_images JSON
);
"""

STAGED, SETTLED = "staged", "settled"


@dataclass
class LoadPlan:
    """The journalled plan of one load batch: what it does to each row that is not `unchanged`."""

    all_created: bool  # every row of the batch is new (the usual first load): nothing else is stored
    actions: dict[str, tuple[str, list[str] | None, str | None]]  # external id -> action, changed, before

    def action_for(self, external_id: str) -> tuple[str, list[str] | None, str | None] | None:
        if self.all_created:
            return ("created", None, None)
        return self.actions.get(external_id)


class Checkpoints:
    def __init__(self, staging: Staging):
        self.staging = staging
        staging.con.execute(_SCHEMA)

    @property
    def con(self):
        return self.staging.con

    # --- entities -------------------------------------------------------------------------------------

    def done(self, entity: str, what: str) -> bool:
        row = self.con.execute("SELECT count(*) FROM stages WHERE entity = ? AND stage = ? AND status = 'done'",
                               [entity, what]).fetchone()
        return bool(row[0])

    def mark_done(self, entity: str, what: str) -> None:
        self.staging.mark(entity, what, "done")

    def note_index_deferred(self, entity: str) -> None:
        """The run is about to create the entity's target table without its external-id index, to add it once
        the entity is loaded: a resume of a killed attempt adds it first, if it is still missing."""
        self.staging.mark(entity, "target_index", "deferred")

    def index_deferred(self, entity: str) -> bool:
        row = self.con.execute("SELECT count(*) FROM stages WHERE entity = ? AND stage = 'target_index' "
                               "AND status = 'deferred'", [entity]).fetchone()
        return bool(row[0])

    def reset_entity(self, entity_name: str, entity) -> None:
        """Forget a half-staged entity: its rows, its extract/validate quarantine and its source counts."""
        self.con.begin()
        self.con.execute(f'DROP TABLE IF EXISTS "{table_name(entity)}"')
        self.con.execute("DELETE FROM quarantine WHERE entity = ? AND stage IN ('extract', 'validate')",
                         [entity_name])
        self.con.execute("DELETE FROM source_counts WHERE entity = ?", [entity_name])
        self.con.execute("DELETE FROM stages WHERE entity = ?", [entity_name])
        self.con.commit()

    # --- load batches ---------------------------------------------------------------------------------

    def loaded(self, entity: str) -> set[int]:
        rows = self.con.execute("SELECT first_seq FROM load_done WHERE entity = ?", [entity]).fetchall()
        return {r[0] for r in rows}

    def mark_loaded(self, entity: str, first_seq: int, last_seq: int) -> None:
        """Call inside the transaction that writes the batch's ledger rows."""
        self.con.execute("INSERT INTO load_done VALUES (?, ?, ?)", [entity, first_seq, last_seq])
        self.con.execute("DELETE FROM load_journal WHERE entity = ? AND first_seq = ?", [entity, first_seq])

    def journal(self, entity: str, first_seq: int, external_ids: list[str], actions: list[str],
                changed: list[list[str] | None], before_images: list[str | None]) -> None:
        """Record the plan of a batch before it is sent to the target (`unchanged` rows are left out)."""
        self.con.execute("DELETE FROM load_journal WHERE entity = ? AND first_seq = ?", [entity, first_seq])
        if all(action == "created" for action in actions):
            self.con.execute("INSERT INTO load_journal VALUES (?, ?, true, NULL, NULL, NULL, NULL)",
                             [entity, first_seq])
            return
        keep = [i for i, action in enumerate(actions) if action in ("created", "updated")]
        self.con.execute("INSERT INTO load_journal VALUES (?, ?, false, ?, ?, ?, ?)", [
            entity, first_seq, [external_ids[i] for i in keep], [actions[i] for i in keep],
            json.dumps([changed[i] for i in keep]), json.dumps([before_images[i] for i in keep]),
        ])

    def plan(self, entity: str, first_seq: int) -> LoadPlan | None:
        """The journalled plan of a batch a crashed attempt may have half written, or None."""
        row = self.con.execute("SELECT all_created, external_ids, actions, changed, before_images "
                               "FROM load_journal WHERE entity = ? AND first_seq = ?",
                               [entity, first_seq]).fetchone()
        if row is None:
            return None
        all_created, external_ids, actions, changed, before = row
        if all_created:
            return LoadPlan(True, {})
        changed, before = json.loads(changed), json.loads(before)
        return LoadPlan(False, {ext: (action, c, b) for ext, action, c, b
                                in zip(external_ids, actions, changed, before, strict=True)})
