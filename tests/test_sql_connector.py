"""The SQL connector against real SQLite, PostgreSQL and MariaDB: round trips of awkward values, native
upserts, large key lookups, isolation of refused rows, clear errors, and schema-drift checks."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from crmbridge.connectors.sql import SqlConnector, SqlSource, SqlTarget
from crmbridge.errors import SchemaDriftError, SourceError, TargetError
from crmbridge.flows.steps import check_source_schema
from crmbridge.mappings.loader import load_mapping
from crmbridge.mappings.model import Mapping
from crmbridge.values import canonical, is_missing

BEIJING = dt.timezone(dt.timedelta(hours=8))
LONG_TEXT = ("Zoë 张伟 😀 " * 12_500)[:100_000]

FIELDS: dict[str, dict[str, Any]] = {
    "name": {"from": "name"},
    "note": {"from": "note"},
    "amount": {"from": "amount", "type": "decimal"},
    "born": {"from": "born", "type": "date"},
    "seen": {"from": "seen", "type": "timestamp"},
    "active": {"from": "active", "type": "boolean"},
    "visits": {"from": "visits", "type": "integer"},
}
TYPES = {name: spec.get("type", "string") for name, spec in FIELDS.items()}


# --- helpers ------------------------------------------------------------------------------------------


def kind_of(url: str) -> str:
    """`sqlite`, `postgresql` or `mysql` (MariaDB is reached through the MySQL dialect)."""
    return sa.engine.make_url(url).get_backend_name()


def make_mapping(tmp_path: Path, url: str, fields: dict[str, dict[str, Any]] | None = None, *,
                 table: str | None = "people", query: str | None = None, target_table: str = "people",
                 columns: dict[str, Any] | None = None, target_key: str | None = None,
                 create_table: bool = True, source_timezone: str | None = "UTC") -> Mapping:
    """A one-entity mapping whose source and target are the same database, loaded like a user's file."""
    source: dict[str, Any] = {"type": "sql", "url": url}
    if source_timezone:
        source["timezone"] = source_timezone
    entity: dict[str, Any] = {"name": "people", "source": "db", "key": "external_id", "target": "db",
                              "target_table": target_table, "create_table": create_table,
                              "fields": fields or FIELDS}
    if query:
        entity["query"] = query
    else:
        entity["table"] = table
    if columns is not None:
        entity["columns"] = columns
    if target_key:
        entity["target_key"] = target_key
    document = {"version": 1, "name": "sql-connector-test", "sources": {"db": source},
                "targets": {"db": {"type": "sql", "url": url}}, "entities": [entity]}
    path = tmp_path / f"mapping-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return load_mapping(path, env={})


@contextmanager
def opened_target(mapping: Mapping) -> Iterator[SqlTarget]:
    target = SqlConnector(mapping.targets["db"], mapping).open_target()
    try:
        yield target
    finally:
        target.close()


def open_source(mapping: Mapping) -> SqlSource:
    return SqlConnector(mapping.sources["db"], mapping).open_source(mapping.entity("people"))


def execute(url: str, *statements: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


def fetch(url: str, statement: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(statement))]
    finally:
        engine.dispose()


def create_database(url: str) -> None:
    """Make sure the database exists (a SQLite source must be an existing file)."""
    execute(url, "SELECT 1")


def with_query(url: str, **params: str) -> str:
    parsed = sa.engine.make_url(url)
    return parsed.update_query_dict(params).render_as_string(hide_password=False)


def sample_rows() -> list[dict[str, Any]]:
    rows = [
        {"external_id": "r01", "name": "张伟", "note": LONG_TEXT, "amount": Decimal("12345.67"),
         "born": dt.date(1980, 2, 29), "seen": dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC),
         "active": True, "visits": 2**40},
        # An aware time in another zone: stored as the same instant in UTC (04:00), not as 12:00.
        {"external_id": "r02", "name": "Zoë Ñúñez-Çelik 😀", "note": "", "amount": Decimal("-0.01"),
         "born": dt.date(1900, 1, 1), "seen": dt.datetime(2024, 6, 1, 12, 0, tzinfo=BEIJING),
         "active": False, "visits": -7},
        {"external_id": "r03", "name": None, "note": None, "amount": None, "born": None, "seen": None,
         "active": None, "visits": None},
    ]
    for i in range(4, 8):
        rows.append({"external_id": f"r{i:02d}", "name": f"Émilie {i}", "note": f"note {i}",
                     "amount": Decimal(f"{i}.{i}"), "born": dt.date(2000, i, i),
                     "seen": dt.datetime(2023, 12, 31, 23, 59, 59, i, tzinfo=dt.UTC),
                     "active": i % 2 == 0, "visits": i})
    return rows


# --- 1. round trip ------------------------------------------------------------------------------------


def test_round_trip_keeps_every_value(any_db_url: str, tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path, any_db_url)
    entity = mapping.entity("people")
    rows = sample_rows()
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=False)
        assert target.write(entity, rows) == []

    # What each dialect really stores for the timestamp written at 12:00+08:00.
    (stored,) = fetch(any_db_url, "SELECT seen FROM people WHERE external_id = 'r02'")[0]
    (precise,) = fetch(any_db_url, "SELECT seen FROM people WHERE external_id = 'r01'")[0]
    kind = kind_of(any_db_url)
    if kind == "postgresql":  # timestamptz: an aware instant
        assert stored.utcoffset() is not None
        assert stored == dt.datetime(2024, 6, 1, 4, 0, tzinfo=dt.UTC)
        assert precise == dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.UTC)
    elif kind == "mysql":  # DATETIME(6): naive UTC, microseconds kept
        assert stored == dt.datetime(2024, 6, 1, 4, 0)
        assert precise == dt.datetime(2024, 1, 2, 3, 4, 5, 123456)
    else:  # SQLite: naive UTC text
        assert stored == "2024-06-01 04:00:00.000000"
        assert precise == "2024-01-02 03:04:05.123456"

    source = open_source(mapping)
    columns = ["external_id", *FIELDS]
    batches = list(source.read(columns, batch_size=3))
    assert [len(b.frame) for b in batches] == [3, 3, 1]
    assert all(len(b.frame) <= 3 and len(b.row_numbers) == len(b.frame) for b in batches)
    assert [int(n) for b in batches for n in b.row_numbers] == list(range(1, len(rows) + 1))
    assert all(list(b.frame.columns) == columns and not b.rejected for b in batches)

    read = [record for b in batches for record in b.frame.astype(object).to_dict("records")]
    assert [r["external_id"] for r in read] == [r["external_id"] for r in rows]  # ordered by key
    for written, got in zip(rows, read, strict=True):
        for name, kind_ in TYPES.items():
            where = (written["external_id"], name)
            assert canonical(got[name], kind_) == canonical(written[name], kind_), where
    first, second, empty = read[0], read[1], read[2]
    assert first["name"] == "张伟" and second["name"] == "Zoë Ñúñez-Çelik 😀"
    assert first["note"] == LONG_TEXT and len(first["note"]) == 100_000
    assert second["note"] == ""  # an empty string is not NULL
    assert Decimal(str(first["amount"])) == Decimal("12345.67")
    assert canonical(first["amount"], "decimal") == "12345.67"
    assert canonical(second["seen"], "timestamp") == "2024-06-01 04:00:00.000000"
    assert int(first["visits"]) == 2**40
    assert all(is_missing(empty[name]) for name in FIELDS)


def test_naive_postgresql_column_gets_utc_in_any_session_zone(postgres_url: str, tmp_path: Path) -> None:
    options = sa.engine.make_url(postgres_url).query["options"]
    url = with_query(postgres_url, options=f"{options} -ctimezone=Asia/Shanghai")
    execute(url, "CREATE TABLE people (external_id varchar(64) PRIMARY KEY, naive timestamp, "
                 "aware timestamptz)")
    fields = {"naive": {"from": "naive", "type": "timestamp"},
              "aware": {"from": "aware", "type": "timestamp"}}
    mapping = make_mapping(tmp_path, url, fields, create_table=False)
    entity = mapping.entity("people")
    moment = dt.datetime(2024, 3, 1, 9, 30, tzinfo=dt.UTC)
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=False)
        assert target.write(entity, [{"external_id": "a", "naive": moment, "aware": moment}]) == []
        existing = target.fetch_existing(entity, ["a"])["a"].values
    naive, aware = fetch(url, "SELECT naive, aware FROM people")[0]
    assert naive == dt.datetime(2024, 3, 1, 9, 30)  # not the session's 17:30
    assert aware == moment and aware.utcoffset() == dt.timedelta(hours=8)  # shown in the session zone
    assert canonical(existing["naive"], "timestamp") == canonical(existing["aware"], "timestamp") \
        == canonical(moment, "timestamp")


# --- 2. upserts -----------------------------------------------------------------------------------------


def test_upsert_is_dialect_native_and_updates_in_place(any_db_url: str, tmp_path: Path) -> None:
    fields = {"name": {"from": "name"}, "visits": {"from": "visits", "type": "integer"}}
    mapping = make_mapping(tmp_path, any_db_url, fields, target_key="id")
    entity = mapping.entity("people")
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=False)
        compiled = str(target._upsert(entity, ["external_id", "name", "visits"])
                       .compile(dialect=target.connector.engine.dialect))
        if kind_of(any_db_url) == "mysql":
            assert "ON DUPLICATE KEY UPDATE" in compiled and "ON CONFLICT" not in compiled
        else:
            assert "ON CONFLICT (external_id) DO UPDATE" in compiled

        first = [{"external_id": f"e{i}", "name": f"name {i}", "visits": i} for i in range(5)]
        assert target.write(entity, first) == []
        ids = target.target_keys(entity, [r["external_id"] for r in first])
        changed = [{"external_id": "e1", "name": "renamed 张", "visits": 100},
                   {"external_id": "e3", "name": None, "visits": 300}]
        assert target.write(entity, changed) == []
        assert target.target_keys(entity, list(ids)) == ids  # same rows, not deleted and re-inserted

    rows = {ext: (name, visits) for ext, name, visits in
            fetch(any_db_url, "SELECT external_id, name, visits FROM people")}
    assert len(rows) == 5
    assert rows["e1"] == ("renamed 张", 100)
    assert rows["e3"] == (None, 300)
    assert rows["e0"] == ("name 0", 0) and rows["e4"] == ("name 4", 4)


# --- 3. lookups across IN-list chunks -------------------------------------------------------------------


def test_fetch_existing_and_target_keys_cross_the_in_chunk(any_db_url: str, tmp_path: Path) -> None:
    fields = {"name": {"from": "name"}, "visits": {"from": "visits", "type": "integer"}}
    mapping = make_mapping(tmp_path, any_db_url, fields, target_key="id")
    entity = mapping.entity("people")
    rows = [{"external_id": f"x{i:05d}", "name": f"n{i}", "visits": i} for i in range(2_500)]
    unknown = [f"missing{i}" for i in range(10)]
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=False)
        assert target.write(entity, rows) == []
        wanted = [r["external_id"] for r in rows[::-1]] + unknown
        existing = target.fetch_existing(entity, wanted)
        keys = target.target_keys(entity, wanted)
    assert len(existing) == 2_500 and set(existing) == {r["external_id"] for r in rows}
    for row in (rows[0], rows[1999], rows[2000], rows[2499]):
        found = existing[row["external_id"]]
        assert found.values == {"name": row["name"], "visits": row["visits"]}
        assert found.target_key == keys[row["external_id"]]
    assert set(keys) == set(existing)
    assert len(set(keys.values())) == 2_500 and all(isinstance(k, int) for k in keys.values())


def test_a_table_empty_when_prepared_is_known_so_a_run_skips_its_look_ups(any_db_url: str, tmp_path: Path) -> None:
    fields = {"name": {"from": "name"}}
    mapping = make_mapping(tmp_path, any_db_url, fields)
    entity = mapping.entity("people")
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=False)  # creates the table: empty
        assert target.empty_when_prepared(entity)
        assert target.write(entity, [{"external_id": "a", "name": "Ann"}]) == []
        assert target.empty_when_prepared(entity)  # as prepared; look-ups themselves still see the row
        assert set(target.fetch_existing(entity, ["a", "b"])) == {"a"}
    with opened_target(mapping) as target:  # the next run (or a resume) finds a row, and looks up
        target.prepare(entity, dry_run=False)
        assert not target.empty_when_prepared(entity)


# --- 4. refused rows ------------------------------------------------------------------------------------


NOT_NULL_DETAIL = {"sqlite": "IntegrityError (code SQLITE_CONSTRAINT_NOTNULL)",
                   "postgresql": "NotNullViolation (code 23502)", "mysql": "IntegrityError (code 1048)"}


def _write_with_two_refused(url: str, tmp_path: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    execute(url, "CREATE TABLE people (external_id VARCHAR(64) PRIMARY KEY, name VARCHAR(100) NOT NULL, "
                 "note VARCHAR(200))")
    fields = {"name": {"from": "name"}, "note": {"from": "note"}}
    mapping = make_mapping(tmp_path, url, fields, create_table=False)
    entity = mapping.entity("people")
    rows = [{"external_id": f"row-{i:02d}", "name": None if i in (7, 33) else f"Name {i}",
             "note": f"private-note-{i}"} for i in range(50)]
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=False)
        failures = target.write(entity, rows)
    return failures, rows


def _assert_two_refused(url: str, failures: list[Any], rows: list[dict[str, Any]]) -> None:
    assert sorted(f.external_id for f in failures) == ["row-07", "row-33"]
    for failure in failures:
        assert failure.reason == "target_rejected"
        # The error class and code, which say what was wrong; never the database's message.
        assert failure.detail == NOT_NULL_DETAIL[kind_of(url)]
        assert "private-note" not in failure.detail and "Name" not in failure.detail
    stored = dict(fetch(url, "SELECT external_id, note FROM people"))
    assert len(stored) == 48
    assert set(stored) == {r["external_id"] for r in rows} - {"row-07", "row-33"}
    assert stored["row-08"] == "private-note-8"


def test_refused_rows_are_isolated_and_the_rest_written(any_db_url: str, tmp_path: Path) -> None:
    failures, rows = _write_with_two_refused(any_db_url, tmp_path)
    _assert_two_refused(any_db_url, failures, rows)


def test_mariadb_refuses_null_even_when_the_server_is_not_strict(mariadb_url: str, tmp_path: Path) -> None:
    # Outside strict mode MariaDB would store '' for the NULLs of a multi-row INSERT and report success.
    lenient = with_query(mariadb_url, sql_mode="NO_ENGINE_SUBSTITUTION")
    failures, rows = _write_with_two_refused(lenient, tmp_path)
    _assert_two_refused(mariadb_url, failures, rows)


# --- 5. errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "postgresql://legacy:S3cretPassw0rd@127.0.0.1:1/legacy",
    "mysql://legacy:S3cretPassw0rd@127.0.0.1:1/legacy",
])
def test_unreachable_database_names_the_system_and_hides_the_password(url: str, tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path, url)
    with pytest.raises(SourceError) as source_failure:
        open_source(mapping).columns()
    with opened_target(mapping) as target, pytest.raises(TargetError) as target_failure:
        target.prepare(mapping.entity("people"), dry_run=False)
    for failure, role in ((source_failure, "source"), (target_failure, "target")):
        message = str(failure.value)
        assert f"cannot connect to {role} `db`" in message
        assert "127.0.0.1:1" in message and "***" in message
        assert "S3cretPassw0rd" not in message


def test_missing_sqlite_source_file_is_an_error_not_a_new_database(tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path, "sqlite:///missing.db")
    with pytest.raises(SourceError, match=r"source `db`.*does not exist"):
        open_source(mapping).columns()
    assert not (tmp_path / "missing.db").exists()


def test_missing_target_table_without_create_table(any_db_url: str, tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path, any_db_url, target_table="crm_people", create_table=False)
    with opened_target(mapping) as target, pytest.raises(TargetError) as failure:
        target.prepare(mapping.entity("people"), dry_run=False)
    message = str(failure.value)
    assert "`crm_people`" in message and "target `db`" in message and "create_table: true" in message


def test_dry_run_does_not_create_the_table(any_db_url: str, tmp_path: Path) -> None:
    mapping = make_mapping(tmp_path, any_db_url)
    entity = mapping.entity("people")
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=True)
        assert target.fetch_existing(entity, ["r01"]) == {}
    engine = sa.create_engine(any_db_url)
    try:
        assert not sa.inspect(engine).has_table("people")
    finally:
        engine.dispose()


def test_missing_target_columns_are_named(any_db_url: str, tmp_path: Path) -> None:
    execute(any_db_url, "CREATE TABLE people (external_id VARCHAR(64) PRIMARY KEY, name VARCHAR(50))")
    mapping = make_mapping(tmp_path, any_db_url, create_table=False)
    with opened_target(mapping) as target, pytest.raises(TargetError) as failure:
        target.prepare(mapping.entity("people"), dry_run=False)
    message = str(failure.value)
    assert "`people`" in message
    for column in ("note", "amount", "born", "seen", "active", "visits"):
        assert f"`{column}`" in message
    assert "`name`" not in message


def test_external_id_column_must_be_unique(any_db_url: str, tmp_path: Path) -> None:
    execute(any_db_url, "CREATE TABLE people (external_id VARCHAR(64), name VARCHAR(50))")
    mapping = make_mapping(tmp_path, any_db_url, {"name": {"from": "name"}}, create_table=False)
    unique = r"`people\.external_id` must be unique"
    with opened_target(mapping) as target, pytest.raises(TargetError, match=unique):
        target.prepare(mapping.entity("people"), dry_run=False)
    # With a unique index it is accepted.
    execute(any_db_url, "CREATE UNIQUE INDEX people_ext ON people (external_id)")
    with opened_target(mapping) as target:
        target.prepare(mapping.entity("people"), dry_run=False)
        assert target.write(mapping.entity("people"), [{"external_id": "a", "name": "x"}]) == []


@pytest.mark.parametrize("query", [
    "SELECT external_id, name, visits, 'at :noon' AS label FROM people WHERE visits > 0;\n",
    "SELECT external_id, name, visits, 'at :noon' AS label\nFROM people\nWHERE visits > 0 -- active only",
], ids=["semicolon", "comment"])
def test_source_query_reads_and_reports_its_columns(any_db_url: str, tmp_path: Path, query: str) -> None:
    execute(any_db_url,
            "CREATE TABLE people (external_id VARCHAR(64) PRIMARY KEY, name VARCHAR(50), visits INTEGER)",
            "INSERT INTO people VALUES ('c', 'Carla', 3), ('a', '张伟', 1), ('b', 'Bo', 0), ('d', 'Dan', 9)")
    fields = {"name": {"from": "name"}, "visits": {"from": "visits", "type": "integer"},
              "label": {"from": "label"}}
    mapping = make_mapping(tmp_path, any_db_url, fields, table=None, query=query)
    source = open_source(mapping)
    columns = ["external_id", "name", "visits", "label"]
    assert [c.name for c in source.columns()] == columns
    batches = list(source.read(columns, batch_size=2))
    assert [len(b.frame) for b in batches] == [2, 1]
    read = [tuple(r) for b in batches for r in b.frame.astype(object).itertuples(index=False)]
    # Ordered by the key; the `:noon` inside the string constant is text, not a bind parameter.
    assert read == [("a", "张伟", 1, "at :noon"), ("c", "Carla", 3, "at :noon"), ("d", "Dan", 9, "at :noon")]
    assert [int(n) for b in batches for n in b.row_numbers] == [1, 2, 3]


def test_broken_source_query_names_the_entity(any_db_url: str, tmp_path: Path) -> None:
    create_database(any_db_url)
    mapping = make_mapping(tmp_path, any_db_url, {"name": {"from": "name"}}, table=None,
                           query="SELECT external_id, name FROM no_such_table")
    with pytest.raises(SourceError, match="entity `people`: the source query failed"):
        open_source(mapping).columns()


def test_missing_source_table_or_column_is_named(any_db_url: str, tmp_path: Path) -> None:
    create_database(any_db_url)
    mapping = make_mapping(tmp_path, any_db_url, table="legacy_people")
    for attempt in (lambda: open_source(mapping).columns(),
                    lambda: list(open_source(mapping).read(["external_id"], 10))):
        with pytest.raises(SourceError) as failure:
            attempt()
        assert "source `db` has no table `legacy_people`" in str(failure.value)

    execute(any_db_url, "CREATE TABLE legacy_people (external_id VARCHAR(64) PRIMARY KEY, name VARCHAR(50))")
    with pytest.raises(SourceError, match=r"`legacy_people` has no column\(s\) `visits`"):
        list(open_source(mapping).read(["external_id", "name", "visits"], 10))


# --- 6. schema drift ------------------------------------------------------------------------------------


def test_schema_drift_on_a_real_postgresql_table(postgres_url: str, tmp_path: Path) -> None:
    execute(postgres_url, "CREATE TABLE legacy_people (external_id integer PRIMARY KEY, visits text, "
                          "created timestamp)",
            "INSERT INTO legacy_people VALUES (1, '3', '2024-01-01 10:00')")
    retyped = make_mapping(tmp_path, postgres_url, {"visits": {"from": "visits", "type": "integer"}},
                           table="legacy_people", columns={"external_id": "integer", "visits": "integer"})
    entity = retyped.entity("people")
    with pytest.raises(SchemaDriftError) as drift:
        check_source_schema(retyped, entity, open_source(retyped), "test db")
    assert "column `visits` is TEXT (string); the mapping expects integer" in str(drift.value)

    fields = {"visits": {"from": "visits"}, "created": {"from": "created"}}
    naive = make_mapping(tmp_path, postgres_url, fields, table="legacy_people", source_timezone=None)
    with pytest.raises(SchemaDriftError) as drift:
        check_source_schema(naive, naive.entity("people"), open_source(naive), "test db")
    message = str(drift.value)
    assert "column `created` holds naive timestamps (TIMESTAMP WITHOUT TIME ZONE)" in message
    assert "visits" not in message.split("found columns")[0]  # text read as text is fine

    zoned = make_mapping(tmp_path, postgres_url, fields, table="legacy_people",
                         source_timezone="Asia/Shanghai")
    check_source_schema(zoned, zoned.entity("people"), open_source(zoned), "test db")  # no error
