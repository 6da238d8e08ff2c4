"""SQL databases through SQLAlchemy 2.x: batched, streaming reads and dialect-native upserts."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, NoSuchTableError, SQLAlchemyError

from crmbridge.connectors.base import (
    ColumnInfo,
    Connector,
    ExistingRow,
    RestoreRow,
    SourceBatch,
    WriteFailure,
)
from crmbridge.errors import CrmbridgeError, SourceError, TargetError
from crmbridge.mappings.envvars import redact_url_password
from crmbridge.mappings.model import Entity
from crmbridge.retry import Backoff, GaveUp, retrying
from crmbridge.values import RowBatch, bulk_work, column_from_values

log = logging.getLogger("crmbridge.run")

_DEFAULT_DRIVERS = {"postgresql": "postgresql+psycopg", "postgres": "postgresql+psycopg",
                    "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}
_IN_CHUNK = 2000  # bind parameters per IN (...) list, well below every dialect's limit
_CONNECT_TIMEOUT = 10  # seconds; libpq would otherwise wait forever for an unanswering host
# MySQL/MariaDB outside strict mode store '' for a NULL in a NOT NULL column of a multi-row INSERT and
# silently truncate long values; strict mode makes the server refuse such rows, so they are reported.
_MYSQL_STRICT = "SET SESSION sql_mode = TRIM(BOTH ',' FROM CONCAT(@@SESSION.sql_mode, ',STRICT_ALL_TABLES'))"


def _error_class(role: str) -> type[CrmbridgeError]:
    return TargetError if role == "target" else SourceError


class SqlConnector(Connector):
    kind = "sql"
    can_write = True

    def __init__(self, connection, mapping):
        super().__init__(connection, mapping)
        self._engine: Engine | None = None

    @property
    def url(self) -> URL:
        return self._parse_url("source")

    def _parse_url(self, role: str) -> URL:
        raw = self.connection.options.get("url")
        if not raw:
            raise _error_class(role)(f"{role} `{self.connection.name}` needs a `url`")
        try:
            url = make_url(raw)
        except ArgumentError:
            raise _error_class(role)(f"{role} `{self.connection.name}`: `url` is not a valid "
                                     "SQLAlchemy URL") from None
        if url.drivername in _DEFAULT_DRIVERS:
            url = url.set(drivername=_DEFAULT_DRIVERS[url.drivername])
        if (url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:"
                and not url.database.startswith("file:")):  # a `file:` URI is passed on as written
            path = self.base_dir / url.database  # relative SQLite paths are relative to the mapping
            url = url.set(database=str(path))
        return url

    def describe(self) -> str:
        return redact_url_password(self.url.render_as_string(hide_password=True))

    @property
    def engine(self) -> Engine:
        return self.engine_for("source")

    def engine_for(self, role: str) -> Engine:
        if self._engine is None:
            url = self._parse_url(role)
            connect_args: dict[str, Any] = {}
            if url.get_driver_name().startswith("psycopg") and "connect_timeout" not in url.query:
                connect_args["connect_timeout"] = _CONNECT_TIMEOUT
            try:
                engine = sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args)
            except (ArgumentError, NoSuchModuleError, ImportError) as error:
                raise _error_class(role)(f"{role} `{self.connection.name}`: cannot use {self.describe()} "
                                         f"({_hide_password(_first_line(error), url)})") from None
            if engine.dialect.name in ("mysql", "mariadb"):
                sa.event.listen(engine, "connect", _strict_mysql_session)
            self._engine = engine
        return self._engine

    def connect(self, role: str) -> sa.Connection:
        engine = self.engine_for(role)
        url = engine.url
        if (role == "source" and url.get_backend_name() == "sqlite" and url.database
                and url.database != ":memory:" and not url.database.startswith("file:")
                and not Path(url.database).is_file()):
            # SQLite would silently create an empty database and report a missing table instead.
            raise SourceError(f"cannot open source `{self.connection.name}` ({self.describe()}): "
                              "the database file does not exist")
        try:
            return engine.connect()
        except DBAPIError as error:
            reason = _hide_password(_first_line(error.orig), url)
            raise _error_class(role)(f"cannot connect to {role} `{self.connection.name}` "
                                     f"({self.describe()}): {reason}") from None

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def open_source(self, entity: Entity) -> SqlSource:
        return SqlSource(self, entity)

    def open_target(self) -> SqlTarget:
        return SqlTarget(self)


def _strict_mysql_session(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(_MYSQL_STRICT)
    finally:
        cursor.close()


def _first_line(error: BaseException | None) -> str:
    """The first line of a driver's connection error, with any URL password removed."""
    text = str(error or "unknown error").strip().splitlines()
    return redact_url_password(text[0] if text else "unknown error")


def _hide_password(text: str, url: URL) -> str:
    """`text` without the URL's password, should a driver ever echo it in an error."""
    password = str(url.password) if url.password else ""
    return text.replace(password, "***") if len(password) >= 3 else text


def _as_subquery_text(query: str) -> str:
    """A user's SELECT made safe to wrap as `(...) AS q`: no trailing `;`, a line break so a trailing
    `-- comment` cannot swallow the `)`, and every `:` literal (SQLAlchemy would take `:name` for a bind
    parameter, e.g. inside a string constant; `\\:` renders as `:`, so `::` casts keep working)."""
    return query.strip().rstrip(";").rstrip().replace(":", "\\:") + "\n"


def _column_info(column: sa.Column, dialect: sa.Dialect) -> ColumnInfo:
    kind = type_category(column.type)
    aware = bool(getattr(column.type, "timezone", False)) if kind == "timestamp" else None
    try:  # the database's own spelling, e.g. `TIMESTAMP WITHOUT TIME ZONE` rather than `TIMESTAMP`
        native = column.type.compile(dialect=dialect)
    except SQLAlchemyError:
        native = str(column.type)
    return ColumnInfo(column.name, kind, native, aware)


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
        self.query = _as_subquery_text(entity.query) if entity.query else None

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
                return [_column_info(c, conn.dialect) for c in table.columns]
            try:
                result = conn.execute(sa.text(f"SELECT * FROM ({self.query}) AS q WHERE 1 = 0"))
            except SQLAlchemyError as error:
                raise SourceError(f"entity `{self.entity.name}`: the source query failed "
                                  f"({type(getattr(error, 'orig', error)).__name__})") from None
            return [ColumnInfo(name, "unknown") for name in result.keys()]  # noqa: SIM118 (a Result is not a dict)

    def _select(self, conn: sa.Connection, columns: Sequence[str]) -> sa.Executable:
        # Ordered by key so a batch boundary means the same rows on every run (needed to resume).
        if self.entity.table:
            table = self._table(conn)
            missing = [c for c in columns if c not in table.c]
            if missing:
                raise SourceError(f"entity `{self.entity.name}`: source table `{self.entity.table}` has no "
                                  f"column(s) {', '.join(f'`{c}`' for c in missing)}")
            keys = [table.c[k] for k in self.entity.key if k in table.c]
            return sa.select(*(table.c[c] for c in columns)).order_by(*keys)
        query = sa.text(self.query).columns(*(sa.column(c) for c in columns))
        subquery = query.subquery("q")
        keys = [subquery.c[k] for k in self.entity.key if k in subquery.c]
        return sa.select(*(subquery.c[c] for c in columns)).order_by(*keys)

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        position = 0
        with self.connector.connect("source") as conn:
            statement = self._select(conn, columns)
            # Rows come as the driver returns them; each column is then converted with the result processor
            # SQLAlchemy would apply value by value inside every row (e.g. SQLite NUMERIC -> Decimal).
            selected = list(statement.selected_columns)
            typed = [c.type for c in selected]
            statement = statement.with_only_columns(
                *(sa.type_coerce(c, sa.types.NullType()).label(c.name) for c in selected),
                maintain_column_froms=True)
            # SQLite's cursor steps through the rows lazily by itself: read it directly, without the
            # row-by-row buffering SQLAlchemy does to stream server-side cursors.
            direct = conn.dialect.name == "sqlite"
            try:
                options = {} if direct else {"stream_results": True, "yield_per": batch_size}
                result = conn.execution_options(**options).execute(statement)
                processors = [t._cached_result_processor(conn.dialect, d[1])
                              for t, d in zip(typed, result.cursor.description, strict=True)]
                batches = (iter(lambda: result.cursor.fetchmany(batch_size), []) if direct
                           else iter(result.partitions(batch_size)))
                while True:
                    with bulk_work():
                        rows = next(batches, None)
                        if rows is None:
                            break
                        values = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
                        values = [v if p is None else list(map(p, v))
                                  for v, p in zip(values, processors, strict=True)]
                        frame = pd.DataFrame({c: column_from_values(v, c)
                                              for c, v in zip(columns, values, strict=True)})
                    numbers = np.arange(position + 1, position + len(rows) + 1)
                    position += len(rows)
                    yield SourceBatch(frame, numbers)
            except (DBAPIError, conn.dialect.loaded_dbapi.Error) as error:
                # Only the error class: the database's message can echo values.
                raise SourceError(f"entity `{self.entity.name}`: reading source "
                                  f"`{self.connector.connection.name}` failed after row {position} "
                                  f"({type(getattr(error, 'orig', None) or error).__name__})") from None

    def close(self) -> None:
        pass


def _sql_type(kind: str, max_length: int | None) -> sa.types.TypeEngine:
    # MySQL/MariaDB TEXT holds only 64 KiB; an unbounded string needs LONGTEXT there.
    unbounded = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
    return {
        "string": sa.String(max_length) if max_length else unbounded,
        "integer": sa.BigInteger(),
        "decimal": sa.Numeric(30, 8),
        "float": sa.Float(),
        "boolean": sa.Boolean(),
        "date": sa.Date(),
        # MySQL/MariaDB DATETIME would drop the microseconds without an explicit precision.
        "timestamp": sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
    }[kind]


def _sqlite_date(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def bind(value: Any) -> Any:  # `isoformat` is the text SQLAlchemy's default SQLite DATE format gives
        return value.isoformat() if type(value) is dt.date else process(value)
    return bind


def _bound(process: Callable[[Any], Any], kind: Any, dialect: str, values: list[Any]) -> list[Any]:
    """A column's values through SQLAlchemy's bind processor. SQLite DATE values take a shortcut with the same
    result: its processor formats each date through a dict (a fifth of a 1M-row write's conversion time)."""
    if dialect == "sqlite" and isinstance(kind, sa.Date):
        probe = dt.date(1, 2, 3)
        if process(probe) == probe.isoformat():  # the default storage format
            process = _sqlite_date(process)
    return list(map(process, values))


class SqlTarget:
    def __init__(self, connector: SqlConnector):
        self.connector = connector
        self.schema = connector.connection.options.get("schema")
        self._tables: dict[str, sa.Table] = {}
        self._naive_utc: dict[str, list[str]] = {}  # entity -> timestamp fields written as naive UTC
        self._not_created: set[str] = set()  # entities whose table a dry run defined but did not create
        self._empty_when_prepared: set[str] = set()  # see `empty_when_prepared`
        self._conn: sa.Connection | None = None
        # Bulk loading (set by the migrate flow): a table the run creates gets its external-id index once its
        # entity is loaded, not before. Adding 1M rows to a text index in external-id order (random) took 3x
        # as long as inserting them and then building the index (bench/migrate_sqlite.py).
        self.bulk_load = False
        self.before_deferring: Callable[[Entity], None] | None = None  # told first (the run's checkpoint)
        self.complete_deferred: set[str] = set()  # entities whose earlier attempt was killed before the index
        self._deferred: dict[tuple[str | None, str], str] = {}  # (schema, table) -> external id column

    @property
    def conn(self) -> sa.Connection:
        if self._conn is None:
            self._conn = self.connector.connect("target")
            if self.dialect == "sqlite":  # a page cache (KiB) that holds a large external-id index, not 2 MiB
                self._conn.exec_driver_sql("PRAGMA cache_size = -65536")
        return self._conn

    @property
    def dialect(self) -> str:
        return self.connector.engine_for("target").dialect.name

    @property
    def concurrent_writes(self) -> bool:
        """Whether writers on several connections make progress at once (SQLite has one write lock per file)."""
        return self.dialect != "sqlite"

    def table(self, entity: Entity) -> sa.Table:
        return self._tables[entity.name]

    def prepare(self, entity: Entity, dry_run: bool) -> None:
        try:
            self._prepare(entity, dry_run)
        finally:
            if self._conn is not None:  # end reflection's transaction: it would hold MariaDB metadata locks
                with contextlib.suppress(SQLAlchemyError):  # a broken connection fails the next use anyway
                    self._conn.rollback()

    def _prepare(self, entity: Entity, dry_run: bool) -> None:
        name = entity.target_table
        try:
            table = sa.Table(name, sa.MetaData(), autoload_with=self.conn, schema=self.schema)
        except NoSuchTableError:
            self.conn.rollback()
            if not entity.create_table:
                raise TargetError(f"entity `{entity.name}`: target `{self.connector.connection.name}` has no "
                                  f"table `{name}` (create it, or set `create_table: true`)") from None
            defer = not dry_run and self._defers_index(entity)
            table = self._define(entity, external_id_unique=not defer)
            if dry_run:
                self._register(entity, table)
                self._not_created.add(entity.name)
                return
            if defer and self.before_deferring is not None:
                self.before_deferring(entity)  # noted before the table exists: a resume then finds the note
            table.create(self.conn)
            self.conn.commit()
            if defer:
                self._deferred[(self.schema, name)] = entity.external_id_column
        wanted = [entity.external_id_column, entity.target_key_column, *entity.fields]
        missing = [c for c in dict.fromkeys(wanted) if c not in table.c]
        if missing:
            raise TargetError(f"entity `{entity.name}`: target table `{name}` has no column(s) "
                              f"{', '.join(f'`{c}`' for c in missing)}")
        if self._index_wanted(table) is None and not self._is_unique(table, entity.external_id_column):
            if entity.name not in self.complete_deferred:
                raise TargetError(f"entity `{entity.name}`: target column `{name}.{entity.external_id_column}` "
                                  "must be unique (a primary key or unique index) so writes can upsert on it; "
                                  "if a crmbridge run created this table and was killed while loading it, "
                                  "`crmbridge resume` that run")
            self._build_external_id_index(entity.name, table, entity.external_id_column)  # resuming a killed run
        self._register(entity, table)
        if self.conn.execute(sa.select(sa.literal(1)).select_from(table).limit(1)).first() is None:
            self._empty_when_prepared.add(entity.name)
        else:
            self._empty_when_prepared.discard(entity.name)

    def _register(self, entity: Entity, table: sa.Table) -> None:
        self._tables[entity.name] = table
        # Only PostgreSQL's timestamptz keeps an offset; the other dialects drop it and would store the
        # wall-clock time, so they get naive UTC (which is what `canonical` reads a naive value as).
        self._naive_utc[entity.name] = [
            name for name, spec in entity.fields.items()
            if spec.type == "timestamp"
            and not (self.dialect == "postgresql" and getattr(table.c[name].type, "timezone", False))
        ]

    def _bindable(self, entity: Entity, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows with their timestamps as the target column stores them (see `_register`)."""
        columns = [c for c in self._naive_utc.get(entity.name, ()) if c in rows[0]]
        if not columns:
            return rows
        if isinstance(rows, RowBatch):  # keep the columns: the write path reads them without building dicts
            return RowBatch({name: [_naive_utc(v) for v in values] if name in columns else values
                             for name, values in rows.columns.items()})
        return [{**row, **{c: _naive_utc(row[c]) for c in columns}} for row in rows]

    def _defers_index(self, entity: Entity) -> bool:
        """Whether a table created for `entity` gets its external-id index after the load: when bulk loading,
        on SQLite and PostgreSQL, and when the external id is the table's key (a table numbering its rows is
        looked up by external id after every write, for the keys it gave)."""
        return (self.bulk_load and self.dialect in ("sqlite", "postgresql")
                and entity.target_key_column == entity.external_id_column)

    def _index_wanted(self, table: sa.Table) -> str | None:
        """The external id column of a table this run created and has not indexed yet (None: no such table)."""
        return self._deferred.get((self.schema, table.name))

    def finish(self, entity: Entity) -> None:
        """The entity is loaded: give its table the external-id index it was created without, if any."""
        table = self._tables.get(entity.name)
        if table is not None:
            self._build_deferred_index(entity.name, table)

    def _build_deferred_index(self, entity_name: str, table: sa.Table) -> None:
        column = self._index_wanted(table)
        if column is not None:
            self._build_external_id_index(entity_name, table, column)

    def _build_external_id_index(self, entity_name: str, table: sa.Table, column: str) -> None:
        # A unique index, not a primary key: SQLite cannot add a primary key to an existing table, and the
        # upsert needs only the uniqueness. Rows of one run never share an external id, so it always builds.
        index = sa.Index(f"{table.name}_{column}_key", table.c[column], unique=True)
        try:
            index.create(self.conn)
            self.conn.commit()
        except SQLAlchemyError as error:
            with contextlib.suppress(SQLAlchemyError):
                self.conn.rollback()
            orig = getattr(error, "orig", None) or error
            raise TargetError(f"entity `{entity_name}`: could not add the unique index on target column "
                              f"`{table.name}.{column}` ({type(orig).__name__}); the rows are loaded, but until "
                              "it exists writes cannot upsert on the external id") from None
        self._deferred.pop((self.schema, table.name), None)

    def _define(self, entity: Entity, external_id_unique: bool = True) -> sa.Table:
        ext = entity.external_id_column
        columns: list[sa.Column] = []
        if entity.target_key_column != ext:
            columns.append(sa.Column(entity.target_key_column, sa.Integer, primary_key=True,
                                     autoincrement=True))
            columns.append(sa.Column(ext, sa.String(64), nullable=False, unique=True))
        elif not external_id_unique:  # indexed after the load (`_defers_index`)
            columns.append(sa.Column(ext, sa.String(64), nullable=False))
        else:
            columns.append(sa.Column(ext, sa.String(64), primary_key=True))
        for spec in entity.fields.values():
            # A reference holds the parent's target key, converted to the field's declared type on load.
            columns.append(sa.Column(spec.name, _sql_type(spec.type, spec.max_length)))
        # MariaDB's `utf8` is 3-byte: emoji and rare CJK characters need utf8mb4 whatever the server default.
        return sa.Table(entity.target_table, sa.MetaData(), *columns, schema=self.schema,
                        mysql_charset="utf8mb4")

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

    def empty_when_prepared(self, entity: Entity) -> bool:
        """Whether the entity's table held no row when `prepare` looked (then a run's look-ups can only find
        rows the run itself wrote, and a run never writes one external id twice)."""
        return entity.name in self._empty_when_prepared

    def fetch_existing(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, ExistingRow]:
        if entity.name in self._not_created:
            return {}
        return self._with_retries(entity, "look-up", lambda: self._fetch_existing(entity, external_ids))

    def _fetch_existing(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, ExistingRow]:
        table = self.table(entity)
        ext, key = table.c[entity.external_id_column], table.c[entity.target_key_column]
        fields = [table.c[f] for f in entity.fields]
        fields_names = list(entity.fields)
        found: dict[str, ExistingRow] = {}
        dialect = self.conn.dialect
        # Each IN-list size is compiled once and run on the driver; the values are converted with the bind
        # and result processors SQLAlchemy would apply, column by column rather than row by row.
        compiled: dict[int, Any] = {}
        ordered = sorted(external_ids)  # each IN list then covers one narrow stretch of the index
        for start in range(0, len(ordered), _IN_CHUNK):
            chunk = ordered[start:start + _IN_CHUNK]
            if len(chunk) not in compiled:
                binds = {f"ext{i}": i for i in range(len(chunk))}
                query = sa.select(ext, key, *fields).where(
                    ext.in_([sa.bindparam(name, type_=ext.type) for name in binds])).compile(dialect=dialect)
                names = list(query.positiontup) if query.positional else list(binds)
                compiled[len(chunk)] = (query, [(query.escaped_bind_names.get(n, n), binds[n],
                                                 query._bind_processors.get(n)) for n in names])
            query, slots = compiled[len(chunk)]
            values = [chunk[i] if process is None else process(chunk[i]) for _, i, process in slots]
            params: Any = (tuple(values) if query.positional
                           else dict(zip((name for name, _, _ in slots), values, strict=True)))
            result = self.conn.exec_driver_sql(query.string, params)
            coltypes = [d[1] for d in result.cursor.description]
            rows = result.fetchall()
            if not rows:
                continue
            columns = [list(c) for c in zip(*rows, strict=True)]
            for i, (column, coltype) in enumerate(zip((ext, key, *fields), coltypes, strict=True)):
                process = column.type._cached_result_processor(dialect, coltype)
                if process is not None:
                    columns[i] = list(map(process, columns[i]))
            for ext_id, target_key, *values in zip(*columns, strict=True):
                found[ext_id] = ExistingRow(target_key, dict(zip(fields_names, values, strict=True)))
        self.conn.rollback()  # end the read transaction; MariaDB would otherwise keep a stale snapshot
        return found

    def target_keys(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, Any]:
        return self._with_retries(entity, "key look-up", lambda: self._target_keys(entity, external_ids))

    def _target_keys(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, Any]:
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
        rows = self._bindable(entity, rows)
        if self._index_wanted(self.table(entity)) is not None:  # no index to upsert on yet: every row is new
            statement: sa.Executable = sa.insert(self.table(entity))
        else:
            statement = self._upsert(entity, list(rows[0]))

        def attempt() -> list[WriteFailure]:  # the whole batch again: an upsert on external ids repeats safely
            failures: list[WriteFailure] = []
            self._write_isolating_failures(entity, statement, rows, failures)
            return failures

        return self._with_retries(entity, "write", attempt)

    def _with_retries(self, entity: Entity, what: str, call: Callable[[], T]) -> T:
        """Run `call`, retrying with backoff on a dropped connection, a deadlock or a busy database."""
        name = self.connector.connection.name
        try:
            return retrying(call, transient=is_transient, what=f"entity {entity.name}: {what} on target {name}",
                            backoff=BACKOFF, before_retry=self._reconnect)
        except GaveUp as gave_up:
            cause = gave_up.last
            reason = type(getattr(cause, "orig", None) or cause).__name__
            raise TargetError(f"entity `{entity.name}`: {what} on target `{name}` failed {gave_up.attempts} times "
                              f"with a transient fault ({reason}: {_fault_kind(cause)}); the batch was not "
                              "recorded, `crmbridge resume` carries on from it") from None

    def _reconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.close()
            self._conn = None

    def _write_isolating_failures(self, entity, statement, rows, failures: list[WriteFailure]) -> None:
        """Write in one go; if the target refuses, bisect to find the refused rows and write the rest.

        The statement is compiled once and the rows go to the driver's `executemany` as plain parameters,
        through SQLAlchemy's own bind processors: the values `conn.execute(statement, rows)` would send,
        without SQLAlchemy building and checking the parameters row by row (most of the write time).
        """
        try:
            compiled = statement.compile(dialect=self.conn.dialect, column_keys=list(rows[0]))
            processors = compiled._bind_processors  # exactly the conversions `conn.execute` applies
            names = list(compiled.positiontup) if compiled.positional else list(compiled.binds)
            keys = [compiled.binds[name].key for name in names]
            escaped = [compiled.escaped_bind_names.get(name, name) for name in names]
        except AttributeError:  # compiler internals moved: let SQLAlchemy build the parameters itself
            compiled = None
        try:
            if compiled is None:
                self.conn.execute(statement, list(rows))
            else:
                try:
                    held = rows.columns if isinstance(rows, RowBatch) else None  # already columns
                    columns = [held[key] if held is not None else [row[key] for row in rows] for key in keys]
                    for i, name in enumerate(names):
                        if processors.get(name) is not None:
                            columns[i] = _bound(processors[name], compiled.binds[name].type, self.dialect,
                                                columns[i])
                except Exception as error:  # what SQLAlchemy reports as a StatementError
                    raise sa.exc.StatementError("a value could not be bound", None, None, error) from None
                params = list(zip(*columns, strict=True))
                if not compiled.positional:
                    params = [dict(zip(escaped, values, strict=True)) for values in params]
                self.conn.exec_driver_sql(compiled.string, params)
            self.conn.commit()
            return
        except sa.exc.OperationalError as error:
            with contextlib.suppress(SQLAlchemyError):  # a dropped connection cannot roll back
                self.conn.rollback()
            if is_transient(error):
                raise  # the caller retries the whole batch
            if len(rows) > 1:
                self._bisect(entity, statement, rows, failures)
            else:
                failures.append(_failure(entity, rows[0], error))
        except (sa.exc.IntegrityError, sa.exc.DataError, sa.exc.ProgrammingError,
                sa.exc.StatementError) as error:
            self.conn.rollback()
            if len(rows) > 1:
                self._bisect(entity, statement, rows, failures)
            else:
                failures.append(_failure(entity, rows[0], error))

    def _bisect(self, entity, statement, rows, failures) -> None:
        middle = len(rows) // 2
        self._write_isolating_failures(entity, statement, rows[:middle], failures)
        self._write_isolating_failures(entity, statement, rows[middle:], failures)

    # --- rollback (connectors.base.ReversibleTarget) ----------------------------------------------------

    def delete(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        if not rows or entity.name in self._not_created:
            return []
        ext = self.table(entity).c[entity.external_id_column]
        ids = [r.external_id for r in rows]
        chunks = [ids[start:start + _IN_CHUNK] for start in range(0, len(ids), _IN_CHUNK)]
        return self._run_each(entity, [(sa.delete(self.table(entity)).where(ext.in_(c)), None, c) for c in chunks])

    def restore(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        if not rows:
            return []
        table = self.table(entity)
        ext = table.c[entity.external_id_column]
        groups: dict[tuple[str, ...], list[RestoreRow]] = {}
        for row in rows:  # one UPDATE statement per set of restored fields
            groups.setdefault(tuple(sorted(row.values)), []).append(row)
        naive = set(self._naive_utc.get(entity.name, ()))
        statements = []
        for fields, group in groups.items():
            statement = (sa.update(table).where(ext == sa.bindparam("b_ext"))
                         .values({f: sa.bindparam(f"b_{i}") for i, f in enumerate(fields)}))
            params = [{"b_ext": r.external_id, **{f"b_{i}": _naive_utc(r.values[f]) if f in naive else r.values[f]
                                                  for i, f in enumerate(fields)}} for r in group]
            statements.append((statement, params, [r.external_id for r in group]))
        return self._run_each(entity, statements)

    def recreate(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        if not rows:
            return []
        key, ext = entity.target_key_column, entity.external_id_column
        integer_key = type_category(self.table(entity).c[key].type) == "integer"
        records = []
        for row in rows:
            record = {ext: row.external_id, **row.values}
            if key != ext and row.target_key is not None:  # the same key, so children still point at it
                record[key] = int(row.target_key) if integer_key else row.target_key
            records.append(record)
        return self.write(entity, records)

    def _run_each(self, entity: Entity, statements: list[tuple[sa.Executable, Any, list[str]]]) -> list[WriteFailure]:
        """Run each statement (with its executemany parameters) in one transaction; when the target refuses
        one, run its rows one at a time so only the refused rows fail."""
        failures: list[WriteFailure] = []
        try:
            for statement, params, _ in statements:
                self.conn.execute(statement, params) if params is not None else self.conn.execute(statement)
            self.conn.commit()
            return failures
        except sa.exc.OperationalError as error:
            self.conn.rollback()
            if _is_connection_error(error):
                raise TargetError(f"entity `{entity.name}`: lost the connection to target "
                                  f"`{self.connector.connection.name}` ({type(error.orig).__name__})") from None
        except (sa.exc.IntegrityError, sa.exc.DataError, sa.exc.ProgrammingError, sa.exc.StatementError):
            self.conn.rollback()
        for statement, params, ids in statements:
            for i, external_id in enumerate(ids):
                if params is None:  # a DELETE of many ids: retry it id by id
                    bound = None
                    single = sa.delete(self.table(entity)).where(
                        self.table(entity).c[entity.external_id_column] == external_id)
                else:
                    single, bound = statement, [params[i]]
                try:
                    self.conn.execute(single, bound) if bound is not None else self.conn.execute(single)
                    self.conn.commit()
                except SQLAlchemyError as error:
                    self.conn.rollback()
                    failures.append(_failure(entity, {entity.external_id_column: external_id}, error))
        return failures

    def close(self) -> None:
        for entity_name, table in list(self._tables.items()):  # a run that failed while loading
            try:
                self._build_deferred_index(entity_name, table)
            except TargetError as error:
                log.warning("%s", error)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.connector.dispose()


def _naive_utc(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def _is_connection_error(error: DBAPIError) -> bool:
    return bool(getattr(error, "connection_invalidated", False))


# Faults worth another try: the statement did not take effect and may well succeed a moment later.
_TRANSIENT_SQLSTATES = {"40001", "40P01", "57P01", "57P02", "57P03"}  # serialization, deadlock, shutdown
_TRANSIENT_MYSQL = {1205, 1213, 2006, 2013}  # lock wait timeout, deadlock, server gone away, lost connection
_TRANSIENT_SQLITE = {"SQLITE_BUSY", "SQLITE_LOCKED"}

BACKOFF = Backoff()
T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    if not isinstance(error, DBAPIError):
        return False
    if _is_connection_error(error):
        return True
    orig = error.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state and (state in _TRANSIENT_SQLSTATES or state.startswith("08")):  # class 08: connection exception
        return True
    args = getattr(orig, "args", None)
    if args and isinstance(args[0], int) and args[0] in _TRANSIENT_MYSQL:
        return True
    return getattr(orig, "sqlite_errorname", None) in _TRANSIENT_SQLITE


def _fault_kind(error: BaseException) -> str:
    if isinstance(error, DBAPIError) and _is_connection_error(error):
        return "connection lost"
    return "busy or deadlocked"


def _failure(entity: Entity, row: dict[str, Any], error: SQLAlchemyError) -> WriteFailure:
    """Describe a refused row by error class and SQLSTATE, never by the message (it can echo values)."""
    orig = getattr(error, "orig", None) or error
    args = getattr(orig, "args", None)
    if args and isinstance(args[0], int):
        code = args[0]  # MySQL error number: 1048 says more than the SQLSTATE class 23000
    else:
        code = (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
                or getattr(orig, "sqlite_errorname", None))  # e.g. SQLITE_CONSTRAINT_NOTNULL
    detail = type(orig).__name__ + (f" (code {code})" if code else "")
    return WriteFailure(str(row[entity.external_id_column]), "target_rejected", detail)
