"""SQL databases through SQLAlchemy 2.x: batched, streaming reads and dialect-native upserts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, NoSuchTableError, SQLAlchemyError

from crmbridge.connectors.base import ColumnInfo, Connector, ExistingRow, SourceBatch, WriteFailure
from crmbridge.errors import SourceError, TargetError
from crmbridge.mappings.envvars import redact_url_password
from crmbridge.mappings.model import Entity
from crmbridge.values import column_from_values

_DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
                    "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}
_IN_CHUNK = 2000  # bind parameters per IN (...) list, well below every dialect's limit


class SqlConnector(Connector):
    kind = "sql"
    can_write = True

    def __init__(self, connection, mapping):
        super().__init__(connection, mapping)
        self._engine: Engine | None = None

    @property
    def url(self) -> URL:
        raw = self.connection.options.get("url")
        if not raw:
            raise SourceError(f"`{self.connection.name}` needs a `url`")
        try:
            url = make_url(raw)
        except ArgumentError:
            raise SourceError(f"`{self.connection.name}`: `url` is not a valid SQLAlchemy URL") from None
        if url.drivername in _DEFAULT_DRIVERS:
            url = url.set(drivername=_DEFAULT_DRIVERS[url.drivername])
        if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
            path = self.base_dir / url.database  # relative SQLite paths are relative to the mapping
            url = url.set(database=str(path))
        return url

    def describe(self) -> str:
        return redact_url_password(self.url.render_as_string(hide_password=True))

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            try:
                self._engine = sa.create_engine(self.url, pool_pre_ping=True)
            except (ArgumentError, NoSuchModuleError, ImportError) as error:
                raise SourceError(f"`{self.connection.name}`: cannot use {self.describe()} ({error})") from None
        return self._engine

    def connect(self, role: str) -> sa.Connection:
        try:
            return self.engine.connect()
        except DBAPIError as error:
            cls = TargetError if role == "target" else SourceError
            raise cls(f"cannot connect to {role} `{self.connection.name}` ({self.describe()}): "
                      f"{_first_line(error.orig)}") from None

    def open_source(self, entity: Entity) -> SqlSource:
        return SqlSource(self, entity)

    def open_target(self) -> SqlTarget:
        return SqlTarget(self)


def _first_line(error: BaseException | None) -> str:
    """The first line of a driver's connection error, with any URL password removed."""
    text = str(error or "unknown error").strip().splitlines()
    return redact_url_password(text[0] if text else "unknown error")


def type_category(sql_type: sa.types.TypeEngine) -> str:
    if isinstance(sql_type, sa.Boolean):
        return "boolean"
    if isinstance(sql_type, sa.Integer):
        return "integer"
    if isinstance(sql_type, sa.Float):
        return "float"
    if isinstance(sql_type, sa.Numeric):
        return "decimal"
    if isinstance(sql_type, sa.DateTime):
        return "timestamp"
    if isinstance(sql_type, sa.Date):
        return "date"
    if isinstance(sql_type, (sa.String, sa.Text, sa.Enum)):
        return "string"
    return "unknown"


class SqlSource:
    def __init__(self, connector: SqlConnector, entity: Entity):
        self.connector, self.entity = connector, entity
        self.schema = connector.connection.options.get("schema")

    def _table(self, conn: sa.Connection) -> sa.Table:
        try:
            return sa.Table(self.entity.table, sa.MetaData(), autoload_with=conn, schema=self.schema)
        except NoSuchTableError:
            raise SourceError(f"source `{self.connector.connection.name}` has no table `{self.entity.table}`"
                              f" ({self.connector.describe()})") from None

    def columns(self) -> list[ColumnInfo]:
        with self.connector.connect("source") as conn:
            if self.entity.table:
                table = self._table(conn)
                return [
                    ColumnInfo(c.name, type_category(c.type), str(c.type),
                               getattr(c.type, "timezone", None) if type_category(c.type) == "timestamp" else None)
                    for c in table.columns
                ]
            try:
                result = conn.execute(sa.text(f"SELECT * FROM ({self.entity.query}) AS q WHERE 1 = 0"))
            except SQLAlchemyError as error:
                raise SourceError(f"entity `{self.entity.name}`: the source query failed "
                                  f"({type(getattr(error, 'orig', error)).__name__})") from None
            return [ColumnInfo(name, "unknown") for name in result.keys()]

    def _select(self, conn: sa.Connection, columns: Sequence[str]) -> sa.Executable:
        if self.entity.table:
            table = self._table(conn)
            keys = [table.c[k] for k in self.entity.key if k in table.c]
            # Ordered by key so a batch boundary means the same rows on every run (needed to resume).
            return sa.select(*(table.c[c] for c in columns)).order_by(*keys)
        query = sa.text(self.entity.query).columns(*(sa.column(c) for c in columns))
        subquery = query.subquery("q")
        return sa.select(*(subquery.c[c] for c in columns))

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        position = 0
        with self.connector.connect("source") as conn:
            statement = self._select(conn, columns)
            try:
                result = conn.execution_options(stream_results=True, yield_per=batch_size).execute(statement)
                for rows in result.partitions(batch_size):
                    values = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
                    frame = pd.DataFrame({c: column_from_values(v, c) for c, v in zip(columns, values, strict=True)})
                    numbers = np.arange(position + 1, position + len(rows) + 1)
                    position += len(rows)
                    yield SourceBatch(frame, numbers)
            except DBAPIError as error:
                raise SourceError(f"entity `{self.entity.name}`: reading source `{self.connector.connection.name}` "
                                  f"failed after row {position} ({type(error.orig).__name__})") from None

    def close(self) -> None:
        pass


def _sql_type(kind: str, max_length: int | None) -> sa.types.TypeEngine:
    return {
        "string": sa.String(max_length) if max_length else sa.Text(),
        "integer": sa.BigInteger(),
        "decimal": sa.Numeric(30, 8),
        "float": sa.Float(),
        "boolean": sa.Boolean(),
        "date": sa.Date(),
        "timestamp": sa.DateTime(timezone=True),
    }[kind]


class SqlTarget:
    def __init__(self, connector: SqlConnector):
        self.connector = connector
        self.schema = connector.connection.options.get("schema")
        self._tables: dict[str, sa.Table] = {}
        self._conn: sa.Connection | None = None

    @property
    def conn(self) -> sa.Connection:
        if self._conn is None:
            self._conn = self.connector.connect("target")
        return self._conn

    @property
    def dialect(self) -> str:
        return self.connector.engine.dialect.name

    def table(self, entity: Entity) -> sa.Table:
        return self._tables[entity.name]

    def prepare(self, entity: Entity, dry_run: bool) -> None:
        name = entity.target_table
        try:
            table = sa.Table(name, sa.MetaData(), autoload_with=self.conn, schema=self.schema)
        except NoSuchTableError:
            self.conn.rollback()
            if not entity.create_table:
                raise TargetError(f"entity `{entity.name}`: target `{self.connector.connection.name}` has no table "
                                  f"`{name}` (create it, or set `create_table: true`)") from None
            table = self._define(entity)
            if dry_run:
                self._tables[entity.name] = table
                return
            table.create(self.conn)
            self.conn.commit()
        wanted = [entity.external_id_column, entity.target_key_column, *entity.fields]
        missing = [c for c in dict.fromkeys(wanted) if c not in table.c]
        if missing:
            raise TargetError(f"entity `{entity.name}`: target table `{name}` has no column(s) "
                              f"{', '.join(f'`{c}`' for c in missing)}")
        if not self._is_unique(table, entity.external_id_column):
            raise TargetError(f"entity `{entity.name}`: target column `{name}.{entity.external_id_column}` must be "
                              "unique (a primary key or unique index) so writes can upsert on it")
        self._tables[entity.name] = table

    def _define(self, entity: Entity) -> sa.Table:
        ext = entity.external_id_column
        columns: list[sa.Column] = []
        if entity.target_key_column != ext:
            columns.append(sa.Column(entity.target_key_column, sa.Integer, primary_key=True, autoincrement=True))
            columns.append(sa.Column(ext, sa.String(64), nullable=False, unique=True))
        else:
            columns.append(sa.Column(ext, sa.String(64), primary_key=True))
        for spec in entity.fields.values():
            kind = "string" if spec.ref and entity.target_key_column == ext else spec.type
            columns.append(sa.Column(spec.name, _sql_type(kind, spec.max_length)))
        return sa.Table(entity.target_table, sa.MetaData(), *columns, schema=self.schema)

    def _is_unique(self, table: sa.Table, column: str) -> bool:
        if [c.name for c in table.primary_key.columns] == [column]:
            return True
        inspector = sa.inspect(self.conn)
        constraints = inspector.get_unique_constraints(table.name, schema=self.schema)
        # SQLite implements an inline UNIQUE as an automatic index, which reflection hides by default.
        extra = {"include_auto_indexes": True} if self.dialect == "sqlite" else {}
        indexes = inspector.get_indexes(table.name, schema=self.schema, **extra)
        return any(c["column_names"] == [column] for c in constraints) or any(
            i.get("unique") and i["column_names"] == [column] for i in indexes
        )

    def fetch_existing(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, ExistingRow]:
        table = self.table(entity)
        if not self._exists(table):
            return {}
        ext, key = table.c[entity.external_id_column], table.c[entity.target_key_column]
        fields = [table.c[f] for f in entity.fields]
        found: dict[str, ExistingRow] = {}
        for start in range(0, len(external_ids), _IN_CHUNK):
            chunk = list(external_ids[start:start + _IN_CHUNK])
            for row in self.conn.execute(sa.select(ext, key, *fields).where(ext.in_(chunk))):
                found[row[0]] = ExistingRow(row[1], dict(zip(entity.fields, row[2:], strict=True)))
        self.conn.rollback()  # end the read transaction; MariaDB would otherwise keep a stale snapshot
        return found

    def _exists(self, table: sa.Table) -> bool:
        return sa.inspect(self.conn).has_table(table.name, schema=self.schema)

    def target_keys(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, Any]:
        table = self.table(entity)
        ext, key = table.c[entity.external_id_column], table.c[entity.target_key_column]
        keys: dict[str, Any] = {}
        for start in range(0, len(external_ids), _IN_CHUNK):
            chunk = list(external_ids[start:start + _IN_CHUNK])
            keys.update(tuple(row) for row in self.conn.execute(sa.select(ext, key).where(ext.in_(chunk))))
        self.conn.rollback()
        return keys

    def _upsert(self, entity: Entity, columns: list[str]) -> sa.Executable:
        table = self.table(entity)
        ext = entity.external_id_column
        updated = [c for c in columns if c != ext]
        if self.dialect in ("sqlite", "postgresql"):
            module = sa.dialects.sqlite if self.dialect == "sqlite" else sa.dialects.postgresql
            stmt = module.insert(table)
            return stmt.on_conflict_do_update(index_elements=[table.c[ext]],
                                              set_={c: stmt.excluded[c] for c in updated})
        if self.dialect in ("mysql", "mariadb"):
            stmt = sa.dialects.mysql.insert(table)
            return stmt.on_duplicate_key_update({c: stmt.inserted[c] for c in updated})
        raise TargetError(f"upsert is not supported for the `{self.dialect}` dialect yet")

    def write(self, entity: Entity, rows: list[dict[str, Any]]) -> list[WriteFailure]:
        if not rows:
            return []
        statement = self._upsert(entity, list(rows[0]))
        failures: list[WriteFailure] = []
        self._write_isolating_failures(entity, statement, rows, failures)
        return failures

    def _write_isolating_failures(self, entity, statement, rows, failures: list[WriteFailure]) -> None:
        """Write in one go; if the target refuses, bisect to find the refused rows and write the rest."""
        try:
            self.conn.execute(statement, rows)
            self.conn.commit()
            return
        except sa.exc.OperationalError as error:
            self.conn.rollback()
            if _is_connection_error(error):
                raise TargetError(f"entity `{entity.name}`: lost the connection to target "
                                  f"`{self.connector.connection.name}` ({type(error.orig).__name__})") from None
            if len(rows) > 1:
                self._bisect(entity, statement, rows, failures)
            else:
                failures.append(_failure(entity, rows[0], error))
        except (sa.exc.IntegrityError, sa.exc.DataError, sa.exc.ProgrammingError, sa.exc.StatementError) as error:
            self.conn.rollback()
            if len(rows) > 1:
                self._bisect(entity, statement, rows, failures)
            else:
                failures.append(_failure(entity, rows[0], error))

    def _bisect(self, entity, statement, rows, failures) -> None:
        middle = len(rows) // 2
        self._write_isolating_failures(entity, statement, rows[:middle], failures)
        self._write_isolating_failures(entity, statement, rows[middle:], failures)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.connector.engine.dispose()


def _is_connection_error(error: DBAPIError) -> bool:
    return bool(getattr(error, "connection_invalidated", False))


def _failure(entity: Entity, row: dict[str, Any], error: SQLAlchemyError) -> WriteFailure:
    """Describe a refused row by error class and SQLSTATE, never by the message (it can echo values)."""
    orig = getattr(error, "orig", None) or error
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code is None and getattr(orig, "args", None) and isinstance(orig.args[0], int):
        code = orig.args[0]  # MySQL error number
    detail = type(orig).__name__ + (f" (code {code})" if code else "")
    return WriteFailure(str(row[entity.external_id_column]), "target_rejected", detail)
