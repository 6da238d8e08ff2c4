"""The run's staging store (one DuckDB file in the run directory).

It holds every cleansed row, the quarantine, the load ledger and per-stage progress, which is what makes a
run previewable, reconcilable and resumable: dedup and load read from here, never from the source again.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from crmbridge.errors import CrmbridgeError
from crmbridge.mappings.model import Entity

_DUCK_TYPES = {"string": "VARCHAR", "integer": "BIGINT", "decimal": "VARCHAR", "float": "DOUBLE",
               "boolean": "BOOLEAN", "date": "DATE", "timestamp": "TIMESTAMPTZ"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS source_counts (entity VARCHAR, batch BIGINT, rows BIGINT);
CREATE TABLE IF NOT EXISTS quarantine (
    entity VARCHAR, row_no BIGINT, source_key VARCHAR, stage VARCHAR, reason VARCHAR, problems JSON
);
CREATE TABLE IF NOT EXISTS ledger (
    entity VARCHAR, row_no BIGINT, source_key VARCHAR, external_id VARCHAR, target_key VARCHAR,
    action VARCHAR,
    changed VARCHAR[],  -- the fields an update changed; NULL for a created row, empty for a merged one
    before_image JSON
);
CREATE TABLE IF NOT EXISTS stages (
    entity VARCHAR, stage VARCHAR, status VARCHAR, noted_at TIMESTAMPTZ DEFAULT now()
);
"""


_FEW = 64  # below this many rows, a plain executemany is cheaper than a columnar insert


_Column = list[Any] | pa.Array | pa.ChunkedArray


def _arrow(values: _Column, kind: pa.DataType) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values if values.type == kind else values.cast(kind)
    return pa.array(values, kind)


# Fields staged as random envelopes (`crmbridge.protection`): DuckDB's string compression gains nothing on
# them and made staging these columns about three times slower (bench/protect.py).
_RANDOM_TEXT = ("encrypt", "blind_index")


def _compression(spec: Any) -> str:
    return " USING COMPRESSION uncompressed" if getattr(spec, "protect", "none") in _RANDOM_TEXT else ""


def table_name(entity: Entity) -> str:
    return f"rows_{entity.name}"


@dataclass
class QuarantineRecord:
    row_no: int
    source_key: str | None
    stage: str
    reason: str  # the first reason code; `problems` has them all
    problems: list[dict[str, str]]


class Staging:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.con = duckdb.connect(str(path))
        except duckdb.IOException as error:
            if "lock" not in str(error).lower():
                raise
            raise CrmbridgeError(f"the staging store {path} is in use by another process "
                                 "(is that run still going?)") from None
        self.con.execute("SET TimeZone = 'UTC'")
        # Committed batches are durable in the write-ahead log either way; checkpointing it every 16 MiB (the
        # default) made staging about twice as slow (bench/migrate_sqlite.py).
        self.con.execute("SET checkpoint_threshold = '64MB'")
        # DuckDB would cache up to 80% of RAM; staged rows are on disk, so a fixed cap keeps memory bounded
        # whatever the row count (bigger joins, sorts and windows spill to a temporary directory).
        self.con.execute("SET memory_limit = '64MB'")
        self.con.execute(_SCHEMA)

    def close(self) -> None:
        # Drop the handle too: a failed run's traceback may keep this object alive until exit.
        self.con.close()
        self.con = None  # type: ignore[assignment]

    # --- rows ---------------------------------------------------------------------------------------

    def create_rows_table(self, entity: Entity) -> None:
        columns = ", ".join(
            f'"{f.name}" {"VARCHAR" if f.ref else _DUCK_TYPES[f.type]}{_compression(f)}' for f in entity.fields.values()
        )
        self.con.execute(f'DROP TABLE IF EXISTS "{table_name(entity)}"')
        self.con.execute(f'CREATE TABLE "{table_name(entity)}" (_seq BIGINT, _row BIGINT, _key VARCHAR, '
                         f'_ext VARCHAR, {columns})')

    def stage_batch(self, entity: Entity, batch_no: int, first_seq: int, frame: pd.DataFrame,
                    source_rows: int, quarantined: Iterable[QuarantineRecord]) -> None:
        """Stage one batch's good rows, its quarantine and its row count in a single transaction."""
        staged = frame.copy()
        staged.insert(0, "_seq", range(first_seq, first_seq + len(staged)))
        self.con.begin()
        try:
            if len(staged):
                self.con.register("batch_frame", staged)
                self.con.execute(f'INSERT INTO "{table_name(entity)}" SELECT * FROM batch_frame')
                self.con.unregister("batch_frame")
            self.add_quarantine(entity, quarantined)
            self.con.execute("INSERT INTO source_counts VALUES (?, ?, ?)",
                             [entity.name, batch_no, source_rows])
            self.con.commit()
        except BaseException:
            self.con.rollback()
            raise

    def add_quarantine(self, entity: Entity, records: Iterable[QuarantineRecord]) -> None:
        rows = [(r.row_no, r.source_key, r.stage, r.reason, json.dumps(r.problems)) for r in records]
        if not rows:
            return
        if len(rows) < _FEW or not all(r[1] is None or type(r[1]) is str for r in rows):
            self.con.executemany("INSERT INTO quarantine VALUES (?, ?, ?, ?, ?, ?)",
                                 [(entity.name, *row) for row in rows])
            return
        # Many rows: one columnar insert (DuckDB's executemany runs one statement per row).
        row_no, source_key, stage, reason, problems = zip(*rows, strict=True)
        frame = pa.table({"row_no": pa.array(row_no, pa.int64()),
                          "source_key": pa.array(source_key, pa.string()),
                          "stage": pa.array(stage, pa.string()), "reason": pa.array(reason, pa.string()),
                          "problems": pa.array(problems, pa.string())})
        self.con.register("quarantine_frame", frame)
        try:
            self.con.execute("INSERT INTO quarantine SELECT ?, row_no, source_key, stage, reason, "
                             "problems::JSON FROM quarantine_frame", [entity.name])
        finally:
            self.con.unregister("quarantine_frame")

    def quarantine_duplicate_keys(self, entity: Entity) -> int:
        """Keep the first row of every source key; later rows with the same key go to quarantine."""
        table = table_name(entity)
        duplicates = self.con.execute(f"""
            SELECT _row, _key FROM (
                SELECT _row, _key, row_number() OVER (PARTITION BY _key ORDER BY _seq) AS n FROM "{table}"
            ) WHERE n > 1 ORDER BY _row""").fetchall()
        if not duplicates:
            return 0
        problem = [{"field": ",".join(entity.key), "code": "duplicate_key",
                    "detail": "an earlier source row has the same key"}]
        self.con.begin()
        self.add_quarantine(entity, (QuarantineRecord(r, k, "validate", "duplicate_key", problem)
                                     for r, k in duplicates))
        self.con.execute(f"""DELETE FROM "{table}" WHERE _row IN (
            SELECT _row FROM (SELECT _row, row_number() OVER (PARTITION BY _key ORDER BY _seq) AS n
                              FROM "{table}") WHERE n > 1)""")
        self.con.commit()
        return len(duplicates)

    def max_seq(self, entity: Entity) -> int:
        return self.con.execute(f'SELECT coalesce(max(_seq), -1) FROM "{table_name(entity)}"').fetchone()[0]

    def rows_for_load_arrow(self, entity: Entity, first_seq: int, last_seq: int) -> pa.Table:
        """Staged rows in a `_seq` range, as Arrow columns, each reference resolved through the ledger.

        For every reference field `F`, adds `F__target` (the parent's target key; NULL for a parent that a
        dry run would create) and `F__resolved` (the parent is in the ledger)."""
        result = self.con.execute(self._load_query(entity), [first_seq, last_seq])
        with warnings.catch_warnings():  # the copy it warns about is one batch; `con.sql` would need the
            warnings.simplefilter("ignore", UserWarning)  # connection free of every earlier result
            return result.to_arrow_table()

    def rows_for_external_ids_arrow(self, entity: Entity, external_ids: list[str]) -> pa.Table:
        """The staged rows with these external ids, references resolved as for loading: what the load wrote
        (rollback compares the target with it to find records changed after the run)."""
        self.con.register("wanted_ext", pa.table({"ext": pa.array(external_ids, pa.string())}))
        try:
            # Filtered before the reference joins and the sort: staging's memory cap holds one batch, not all rows.
            result = self.con.execute(self._load_query(entity, "s._ext IN (SELECT ext FROM wanted_ext)"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                return result.to_arrow_table()
        finally:
            self.con.unregister("wanted_ext")

    def _load_query(self, entity: Entity, where: str = "s._seq BETWEEN ? AND ?") -> str:
        select = ["s.*"]
        joins = []
        for i, spec in enumerate(f for f in entity.fields.values() if f.ref):
            alias = f"p{i}"
            joins.append(f"LEFT JOIN ledger {alias} ON {alias}.entity = '{spec.ref}' "
                         f'AND {alias}.source_key = s."{spec.name}"')
            select.append(f'{alias}.target_key AS "{spec.name}__target"')
            select.append(f'({alias}.entity IS NOT NULL) AS "{spec.name}__resolved"')
        return (f'SELECT {", ".join(select)} FROM "{table_name(entity)}" s {" ".join(joins)} '
                f"WHERE {where} ORDER BY s._seq")

    # --- ledger and progress ------------------------------------------------------------------------

    def add_ledger_columns(self, entity: Entity, row_no: _Column, source_key: _Column, external_id: _Column,
                           target_key: _Column, action: _Column, changed: _Column, before_image: _Column) -> None:
        """The ledger rows of one load batch, as columns (lists or Arrow arrays).

        `changed` names the fields an update changed; it is NULL for a created row (every field is new), which
        keeps the common case from storing one list per row (a fifth of the ledger insert's cost at 1M rows).
        """
        if not len(row_no):
            return
        if not isinstance(target_key, (pa.Array, pa.ChunkedArray)):
            target_key = [None if v is None else str(v) for v in target_key]
        frame = pa.table({
            "row_no": _arrow(row_no, pa.int64()),
            "source_key": _arrow(source_key, pa.string()),
            "external_id": _arrow(external_id, pa.string()),
            "target_key": _arrow(target_key, pa.string()),
            "action": _arrow(action, pa.string()),
            "changed": _arrow(changed, pa.list_(pa.string())),
            "before_image": _arrow(before_image, pa.string()),
        })
        self.con.register("ledger_frame", frame)
        try:
            self.con.execute("INSERT INTO ledger SELECT ?, row_no, source_key, external_id, target_key, "
                             "action, changed, before_image::JSON FROM ledger_frame", [entity.name])
        finally:
            self.con.unregister("ledger_frame")

    def mark(self, entity: str, stage: str, status: str) -> None:
        self.con.execute("INSERT INTO stages (entity, stage, status) VALUES (?, ?, ?)",
                         [entity, stage, status])

    # --- counts -------------------------------------------------------------------------------------

    def source_rows(self, entity: str) -> int:
        return self.con.execute("SELECT coalesce(sum(rows), 0) FROM source_counts WHERE entity = ?",
                                [entity]).fetchone()[0]

    def action_counts(self, entity: str) -> dict[str, int]:
        return dict(self.con.execute("SELECT action, count(*) FROM ledger WHERE entity = ? GROUP BY action",
                                     [entity]).fetchall())

    def quarantine_count(self, entity: str) -> int:
        return self.con.execute("SELECT count(*) FROM quarantine WHERE entity = ?", [entity]).fetchone()[0]

    def rows_in_two_buckets(self, entity: str) -> int:
        return self.con.execute("""
            SELECT count(*) FROM (
                SELECT row_no FROM (SELECT row_no FROM ledger WHERE entity = ?
                                    UNION ALL SELECT row_no FROM quarantine WHERE entity = ?)
                GROUP BY row_no HAVING count(*) > 1)""", [entity, entity]).fetchone()[0]

    def quarantine_frame(self, entity: str | None = None) -> pd.DataFrame:
        where, params = ("WHERE entity = ?", [entity]) if entity else ("", [])
        return self.con.execute(f"SELECT entity, row_no, source_key, stage, reason, problems FROM quarantine "
                                f"{where} ORDER BY entity, row_no", params).df()

    def ledger_frame(self, entity: str | None = None) -> pd.DataFrame:
        where, params = ("WHERE entity = ?", [entity]) if entity else ("", [])
        return self.con.execute(f"SELECT * FROM ledger {where} ORDER BY entity, row_no", params).df()
