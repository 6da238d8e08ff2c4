"""The SQL target's rollback capability on SQLite, PostgreSQL and MariaDB: before-image values survive the round
trip canonical text -> typed value -> target; deleting, restoring chosen fields and re-creating with the old
target key; refused rows are reported by class, never by value; and the verdicts rollback draws per record."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import pytest

from crmbridge.connectors import connector_for
from crmbridge.connectors.base import ExistingRow, RestoreRow, ReversibleTarget
from crmbridge.flows.rollback import decide, from_canonical
from crmbridge.mappings import load_mapping
from crmbridge.values import canonical

MAPPING = """\
version: 1
name: rollback-target
sources:
  src: {type: csv, path: unused.csv, timezone: UTC}
targets:
  db: {type: sql, url: "${ROLLBACK_DB_URL}"}
entities:
  - name: people
    source: src
    key: id
    target: db
    target_table: rb_people
    target_key: id
    create_table: true
    fields:
      name: {from: name, max_length: 40}
      amount: {from: amount, type: decimal}
      score: {from: score, type: float}
      active: {from: active, type: boolean}
      born: {from: born, type: date}
      seen_at: {from: seen_at, type: timestamp}
      visits: {from: visits, type: integer}
"""

ROW = {"name": "Zoë 王", "amount": Decimal("1234.50"), "score": 0.25, "active": False, "born": dt.date(1990, 2, 28),
       "seen_at": dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC), "visits": 7}


@pytest.fixture
def people(tmp_path: Path, any_db_url: str, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "mapping.yaml").write_text(MAPPING, encoding="utf-8")
    monkeypatch.setenv("ROLLBACK_DB_URL", any_db_url)
    mapping = load_mapping(tmp_path / "mapping.yaml")
    entity = mapping.entity("people")
    target = connector_for(mapping.targets["db"], mapping).open_target()
    target.prepare(entity, dry_run=False)
    yield entity, target
    target.close()


def _read(target, entity, ids) -> dict[str, ExistingRow]:
    return target.fetch_existing(entity, ids)


def test_canonical_text_round_trips_to_equal_values() -> None:
    for name, value in ROW.items():
        kind = {"name": "string", "amount": "decimal", "score": "float", "active": "boolean", "born": "date",
                "seen_at": "timestamp", "visits": "integer"}[name]
        assert canonical(from_canonical(canonical(value, kind), kind), kind) == canonical(value, kind), name
    assert from_canonical(None, "integer") is None and from_canonical("false", "boolean") is False


def test_delete_restore_and_recreate_on_every_database(people) -> None:
    entity, target = people
    assert isinstance(target, ReversibleTarget)
    rows = [{"external_id": f"ext-{i}", **ROW, "visits": i} for i in range(3)]
    assert target.write(entity, rows) == []
    keys = target.target_keys(entity, ["ext-0", "ext-1", "ext-2"])

    # Restore exactly the given fields, typed from their canonical before-image text; other fields stay.
    before = {"name": "Old Name", "amount": "99.5", "seen_at": "2020-01-02 03:04:05.000006", "active": "true"}
    values = {n: from_canonical(v, entity.fields[n].type) for n, v in before.items()}
    assert target.restore(entity, [RestoreRow("ext-1", keys["ext-1"], values)]) == []
    current = _read(target, entity, ["ext-1"])["ext-1"].values
    for name, text in before.items():
        assert canonical(current[name], entity.fields[name].type) == canonical(
            from_canonical(text, entity.fields[name].type), entity.fields[name].type), name
    assert current["visits"] == 1 and canonical(current["born"], "date") == "1990-02-28"

    # Delete, then a second delete of the same record is no failure (idempotent).
    assert target.delete(entity, [RestoreRow("ext-2", keys["ext-2"], {})]) == []
    assert target.delete(entity, [RestoreRow("ext-2", keys["ext-2"], {})]) == []
    assert set(_read(target, entity, ["ext-0", "ext-1", "ext-2"])) == {"ext-0", "ext-1"}

    # Re-create with its old target key (children point at it), all fields from a full before-image.
    image = {n: canonical(v, entity.fields[n].type) for n, v in {**ROW, "visits": 2}.items()}
    full = {n: from_canonical(image[n], entity.fields[n].type) for n in entity.fields}
    assert target.recreate(entity, [RestoreRow("ext-2", keys["ext-2"], full)]) == []
    back = _read(target, entity, ["ext-2"])["ext-2"]
    assert str(back.target_key) == str(keys["ext-2"])
    assert {n: canonical(v, entity.fields[n].type) for n, v in back.values.items()} == image

    # A value the target refuses (too long for the column) fails that record only, by error class.
    failures = target.restore(entity, [RestoreRow("ext-0", keys["ext-0"], {"name": "x" * 500}),
                                       RestoreRow("ext-1", keys["ext-1"], {"name": "Fine"})])
    if target.dialect != "sqlite":  # SQLite does not enforce VARCHAR lengths
        assert [f.external_id for f in failures] == ["ext-0"] and "x" * 10 not in failures[0].detail
    assert _read(target, entity, ["ext-1"])["ext-1"].values["name"] == "Fine"


def _entity() -> SimpleNamespace:
    """An entity with a text and an integer field: all `decide` looks at."""
    return SimpleNamespace(fields={"name": SimpleNamespace(type="string"), "visits": SimpleNamespace(type="integer")})


@pytest.mark.parametrize("action, current, after, force, verdict, fields", [
    ("created", None, {"name": "A", "visits": 1}, False, "already_undone", []),
    ("created", {"name": "A", "visits": 1}, {"name": "A", "visits": 1}, False, "undo", []),
    ("created", {"name": "B", "visits": 1}, {"name": "A", "visits": 1}, False, "changed", ["name"]),
    ("created", {"name": "B", "visits": 1}, {"name": "A", "visits": 1}, True, "undo", ["name"]),
    ("created", {"name": "A", "visits": 1}, None, False, "changed", []),
    ("updated", {"name": "New", "visits": 1}, {"name": "New", "visits": 1}, False, "undo", []),
    ("updated", {"name": "Old", "visits": 1}, {"name": "New", "visits": 1}, False, "already_undone", []),
    ("updated", {"name": "Old", "visits": 2}, {"name": "New", "visits": 1}, False, "changed", ["visits"]),
    ("updated", {"name": "Other", "visits": 1}, {"name": "New", "visits": 1}, False, "changed", ["name"]),
    ("updated", None, {"name": "New", "visits": 1}, True, "missing", []),
    ("deleted", None, None, False, "undo", []),
    ("deleted", {"name": "Old", "visits": 1}, None, False, "already_undone", []),
    ("deleted", {"name": "Else", "visits": 1}, None, False, "changed", ["name"]),
])
def test_each_record_gets_one_verdict(action, current, after, force, verdict, fields) -> None:
    image = {"name": "Old"} if action == "updated" else {"name": "Old", "visits": "1"}
    row = None if current is None else ExistingRow(5, current)
    decision = decide(_entity(), action, "ext", "5", ["name"] if action == "updated" else [],
                      json.dumps(image) if action != "created" else None, after, row, force)
    assert (decision.verdict, decision.fields) == (verdict, fields)
    if verdict == "undo" and action != "created":
        assert decision.values["name"] == "Old"  # typed from the before-image, ready to write
