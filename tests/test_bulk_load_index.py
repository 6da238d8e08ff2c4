"""A target table the run creates gets its external-id index after its entity is loaded (`SqlTarget.bulk_load`):
building the index once is far cheaper than adding every row to it. Until then every row is new, so writes are
plain inserts; a run that fails, or is killed and resumed, still ends with the index."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from crmbridge.connectors.sql import SqlConnector
from crmbridge.errors import TargetError
from crmbridge.flows.migrate import start_run
from crmbridge.mappings import load_mapping
from crmbridge.runs import list_runs
from crmbridge.staging import Staging
from crmbridge.values import RowBatch

MAPPING = """\
version: 1
name: bulk-index
settings:
  batch_size: 4
sources:
  legacy:
    type: sql
    url: sqlite:///source.db
targets:
  crm:
    type: sql
    url: {target}
entities:
  - name: people
    source: legacy
    table: people
    key: id
    target: crm
    target_table: person
    create_table: true
    fields:
      name: {{from: name, transform: [trim], required: true}}
  - name: numbered
    source: legacy
    table: people
    key: id
    target: crm
    target_table: numbered
    create_table: true
    target_key: id
    fields:
      name: {{from: name, transform: [trim], required: true}}
"""

PEOPLE = 10


def _project(tmp_path: Path, target: str = "sqlite:///target.db") -> Path:
    with sqlite3.connect(tmp_path / "source.db") as con:
        con.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)")
        con.executemany("INSERT INTO people VALUES (?, ?)", [(i, f" person {i} ") for i in range(1, PEOPLE + 1)])
    (tmp_path / "mapping.yaml").write_text(MAPPING.format(target=target), encoding="utf-8")
    return tmp_path


def _unique_indexes(url: str, table: str) -> list[list[str]]:
    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        extra = {"include_auto_indexes": True} if engine.dialect.name == "sqlite" else {}  # inline UNIQUE
        found = [i["column_names"] for i in inspector.get_indexes(table, **extra) if i.get("unique")]
        found += [c["column_names"] for c in inspector.get_unique_constraints(table)
                  if c["column_names"] not in found]
        primary = inspector.get_pk_constraint(table)["constrained_columns"]
        return found + ([primary] if primary and primary not in found else [])
    finally:
        engine.dispose()


def _target(project: Path, bulk: bool = True):
    mapping = load_mapping(project / "mapping.yaml")
    target = SqlConnector(mapping.targets["crm"], mapping).open_target()
    target.bulk_load = bulk
    return mapping, target


def _rows(first: int, last: int, name: str = "n") -> RowBatch:
    ids = [f"ext-{i:03d}" for i in range(first, last + 1)]
    return RowBatch({"external_id": ids, "name": [f"{name}{i}" for i in range(first, last + 1)]})


@pytest.mark.prefect
def test_a_run_creates_its_table_then_indexes_the_external_id_once_loaded(tmp_path: Path) -> None:
    project = _project(tmp_path)
    url = f"sqlite:///{project / 'target.db'}"
    _, result = start_run(project / "mapping.yaml")
    assert all(e["created"] == PEOPLE and e["balanced"] for e in result["entities"])
    assert _unique_indexes(url, "person") == [["external_id"]]  # built after the load
    assert ["external_id"] in _unique_indexes(url, "numbered")  # a numbering table: unique from the start

    run = list_runs(project / ".crmbridge")[-1]
    staging = Staging(run.staging_path)
    try:
        notes = staging.con.execute("SELECT entity FROM stages WHERE stage = 'target_index'").fetchall()
    finally:
        staging.close()
    assert notes == [("people",)]  # noted, for a resume, before the table was created

    _, again = start_run(project / "mapping.yaml")  # now it upserts on the index: nothing new
    assert all(e["unchanged"] == PEOPLE and e["created"] == 0 for e in again["entities"])
    with sqlite3.connect(project / "target.db") as con:
        assert con.execute("SELECT count(*), count(DISTINCT external_id) FROM person").fetchone() == (PEOPLE, PEOPLE)


@pytest.mark.prefect
def test_a_dry_run_creates_and_defers_nothing(tmp_path: Path) -> None:
    project = _project(tmp_path)
    start_run(project / "mapping.yaml", dry_run=True)
    with sqlite3.connect(project / "target.db") as con:
        assert con.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    run = list_runs(project / ".crmbridge")[-1]
    staging = Staging(run.staging_path)
    try:
        assert staging.con.execute("SELECT count(*) FROM stages WHERE stage = 'target_index'").fetchone() == (0,)
    finally:
        staging.close()


def _write_then_finish(project: Path, url: str) -> None:
    mapping, target = _target(project)
    entity = mapping.entity("people")
    told: list[str] = []
    target.before_deferring = lambda e: told.append(e.name)
    try:
        target.prepare(entity, False)
        assert told == ["people"]
        assert _unique_indexes(url, "person") == []  # created without it
        assert target.empty_when_prepared(entity)
        assert target.write(entity, _rows(1, 6)) == []  # plain inserts
        assert target.write(entity, _rows(7, 9)) == []
        target.finish(entity)
        assert _unique_indexes(url, "person") == [["external_id"]]
        assert target.write(entity, _rows(5, 12, name="m")) == []  # upserts from now on
        keys = target.target_keys(entity, [f"ext-{i:03d}" for i in range(1, 13)])
        assert len(keys) == 12
        existing = target.fetch_existing(entity, ["ext-005", "ext-001"])
        assert existing["ext-005"].values["name"] == "m5" and existing["ext-001"].values["name"] == "n1"
    finally:
        target.close()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*), count(DISTINCT external_id) FROM person")).one() == (12, 12)
    finally:
        engine.dispose()


def test_writes_before_the_index_are_inserts_and_after_it_upserts(tmp_path: Path) -> None:
    project = _project(tmp_path)
    _write_then_finish(project, f"sqlite:///{project / 'target.db'}")


def test_the_same_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    project = _project(tmp_path, postgres_url)
    _write_then_finish(project, postgres_url)


def test_a_run_that_fails_before_finishing_still_leaves_the_index(tmp_path: Path) -> None:
    project = _project(tmp_path)
    mapping, target = _target(project)
    entity = mapping.entity("people")
    target.prepare(entity, False)
    target.write(entity, _rows(1, 5))
    target.close()  # what the flow does when the run fails: the index is built on the way out
    assert _unique_indexes(f"sqlite:///{project / 'target.db'}", "person") == [["external_id"]]


def test_a_resumed_run_adds_the_index_a_killed_attempt_left_out(tmp_path: Path) -> None:
    project = _project(tmp_path)
    url = f"sqlite:///{project / 'target.db'}"
    mapping, killed = _target(project)
    entity = mapping.entity("people")
    killed.prepare(entity, False)
    killed.write(entity, _rows(1, 5))
    killed._conn.close()  # the process died: no `finish`, no `close`
    assert _unique_indexes(url, "person") == []

    _, stranger = _target(project)  # a run that does not know this table: refuses it, and says what to do
    with pytest.raises(TargetError) as refused:
        stranger.prepare(entity, False)
    assert "must be unique" in str(refused.value) and "crmbridge resume" in str(refused.value)
    stranger.close()

    _, resumed = _target(project)
    resumed.complete_deferred.add("people")  # the run's checkpoint says it deferred the index
    try:
        resumed.prepare(entity, False)
        assert _unique_indexes(url, "person") == [["external_id"]]
        assert not resumed.empty_when_prepared(entity)  # rows of the killed attempt are there: look them up
        assert resumed.write(entity, _rows(4, 8)) == []  # a half-written batch again: upserted, not doubled
    finally:
        resumed.close()
    with sqlite3.connect(project / "target.db") as con:
        assert con.execute("SELECT count(*), count(DISTINCT external_id) FROM person").fetchone() == (8, 8)


def test_without_bulk_loading_the_table_is_keyed_from_the_start(tmp_path: Path) -> None:
    project = _project(tmp_path)
    mapping, target = _target(project, bulk=False)
    try:
        target.prepare(mapping.entity("people"), False)
    finally:
        target.close()
    assert _unique_indexes(f"sqlite:///{project / 'target.db'}", "person") == [["external_id"]]


def test_a_resume_on_a_cluster_still_adds_the_index_a_killed_run_left_out(tmp_path: Path) -> None:
    from crmbridge.checkpoints import Checkpoints
    from crmbridge.flows import migrate, steps

    project = _project(tmp_path)
    mapping, killed = _target(project)
    entity = mapping.entity("people")
    killed.prepare(entity, False)
    killed._conn.close()  # killed before its entity was loaded: no index
    staging = Staging(tmp_path / "staging.duckdb")
    checkpoints = Checkpoints(staging)
    checkpoints.note_index_deferred("people")
    ctx = steps.RunContext(mapping, None, staging, None, checkpoints=checkpoints, distributed=True)  # type: ignore[arg-type]
    try:
        target = migrate._bulk_load(ctx, entity)
        assert target.bulk_load is False  # workers write on connections of their own: no deferring
        target.prepare(entity, False)
        assert _unique_indexes(f"sqlite:///{project / 'target.db'}", "person") == [["external_id"]]
    finally:
        ctx.close()
        staging.close()
