"""Rows keyed in the target by their external id load in external-id order (`Staging.order_for_load`): each
load batch is one contiguous range of external ids, which a target indexing them writes far faster. Every
staged row still loads exactly once, and a target that numbers its rows keeps numbering them in source order."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyarrow as pa
import pytest

from crmbridge.flows.migrate import start_run
from crmbridge.mappings import load_mapping
from crmbridge.runs import list_runs
from crmbridge.staging import Staging

BATCH = 7
PEOPLE = 60

MAPPING = f"""\
version: 1
name: load-order
settings:
  batch_size: {BATCH}
sources:
  legacy:
    type: sql
    url: sqlite:///source.db
targets:
  crm:
    type: sql
    url: sqlite:///target.db
entities:
  - name: accounts
    source: legacy
    table: people
    key: id
    target: crm
    target_table: account
    create_table: true
    target_key: id
    fields:
      name: {{from: name, transform: [trim], required: true}}
  - name: people
    source: legacy
    table: people
    key: id
    target: crm
    target_table: person
    create_table: true
    fields:
      name: {{from: name, transform: [trim], required: true}}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    with sqlite3.connect(tmp_path / "source.db") as con:
        con.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)")
        con.executemany("INSERT INTO people VALUES (?, ?)",
                        [(i, "" if i % 13 == 0 else f" person {i} ") for i in range(1, PEOPLE + 1)])
    (tmp_path / "mapping.yaml").write_text(MAPPING, encoding="utf-8")
    return tmp_path


def _in_insertion_order(db: Path, table: str, column: str) -> list:
    with sqlite3.connect(db) as con:  # a rowid table: rowids follow the order the rows were inserted in
        return [r[0] for r in con.execute(f"SELECT {column} FROM {table} ORDER BY rowid")]


@pytest.mark.prefect
def test_rows_keyed_by_external_id_reach_the_target_in_its_order(project: Path) -> None:
    _, result = start_run(project / "mapping.yaml")
    counts = {e["entity"]: e for e in result["entities"]}
    quarantined = len([i for i in range(1, PEOPLE + 1) if i % 13 == 0])
    for name in ("accounts", "people"):
        assert counts[name]["created"] == PEOPLE - quarantined
        assert counts[name]["quarantined"] == quarantined
        assert counts[name]["balanced"]

    inserted = _in_insertion_order(project / "target.db", "person", "external_id")
    assert len(inserted) == len(set(inserted)) == PEOPLE - quarantined
    assert inserted == sorted(inserted)  # every batch a range of external ids, the ranges in order

    numbered = _in_insertion_order(project / "target.db", "account", "id")
    assert numbered == sorted(numbered)  # the target's own keys, given in source order as before
    with sqlite3.connect(project / "target.db") as con:
        names = [r[0] for r in con.execute("SELECT name FROM account ORDER BY id")]
    assert names == [f"person {i}" for i in range(1, PEOPLE + 1) if i % 13]

    _, again = start_run(project / "mapping.yaml")  # the rerun compares batch by batch in the same order
    people = next(e for e in again["entities"] if e["entity"] == "people")
    assert people["unchanged"] == PEOPLE - quarantined and people["created"] == people["updated"] == 0


@pytest.mark.prefect
def test_only_the_entity_keyed_by_external_id_gets_a_load_order(project: Path) -> None:
    start_run(project / "mapping.yaml")
    run = list_runs(project / ".crmbridge")[-1]
    mapping = load_mapping(project / "mapping.yaml")
    staging = Staging(run.staging_path)
    try:
        accounts, people = (mapping.entity(name) for name in ("accounts", "people"))
        assert staging.load_order_size(accounts) is None
        assert staging.load_order_size(people) == PEOPLE - PEOPLE // 13
        ledger = staging.ledger_frame("people")
        assert sorted(ledger["row_no"]) == [i for i in range(1, PEOPLE + 1) if i % 13]
    finally:
        staging.close()


def test_load_order_batches_are_disjoint_ranges_covering_every_row(tmp_path: Path, project: Path) -> None:
    mapping = load_mapping(project / "mapping.yaml")
    entity = mapping.entity("people")
    staging = Staging(tmp_path / "staging.duckdb")
    try:
        staging.create_rows_table(entity)
        exts = [f"{(i * 7919) % 1000:03d}-ext" for i in range(100)]  # source order is not external-id order
        staging.con.register("frame", pa.table({
            "_seq": pa.array(range(100), pa.int64()), "_row": pa.array(range(1, 101), pa.int64()),
            "_key": pa.array([str(i) for i in range(100)]), "_ext": pa.array(exts),
            "name": pa.array([f"n{i}" for i in range(100)])}))
        staging.con.execute(f'INSERT INTO "rows_{entity.name}" SELECT * FROM frame')
        staging.con.execute(f'DELETE FROM "rows_{entity.name}" WHERE _seq % 10 = 3')  # gaps, as after dedupe
        assert staging.load_order_size(entity) is None
        staging.order_for_load(entity)
        size = staging.load_order_size(entity)
        assert size == 90

        batches = [staging.rows_for_load_arrow(entity, first, min(first + 8, size - 1), in_load_order=True)
                   for first in range(0, size, 9)]
        seen = [ext for batch in batches for ext in batch.column("_ext").to_pylist()]
        assert seen == sorted(e for i, e in enumerate(exts) if i % 10 != 3)
        assert all(batch.num_rows == 9 for batch in batches)
        by_seq = staging.rows_for_load_arrow(entity, 0, 99)  # `_seq` ranges still mean what they meant
        assert by_seq.column("_seq").to_pylist() == [i for i in range(100) if i % 10 != 3]
    finally:
        staging.close()
