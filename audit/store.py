"""The append-only event store, through SQLAlchemy: a SQLite file by default, PostgreSQL for teams.

There is no update path in this module, and the only delete is `purge_through`, which removes events
already covered by a signed archive anchor. The database enforces the same: triggers refuse UPDATE and
DELETE (and, on PostgreSQL, TRUNCATE) except the anchored purge. Appends are serialised — `BEGIN
IMMEDIATE` on SQLite, a transaction-scoped advisory lock on PostgreSQL — so concurrent runs extend one chain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    text,
)

from crmbridge.audit.canonical import COLUMNS, GENESIS
from crmbridge.errors import CrmbridgeError

ADVISORY_LOCK = 0x63726D62  # "crmb": one lock id for every crmbridge audit store in a database

metadata = MetaData()
events = Table(
    "audit_events", metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", String(40), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(40), nullable=False),
    Column("run_id", String(80)),
    Column("entity", String(200)),
    Column("source_ref", String(64)),
    Column("subject_ref", String(64)),
    Column("target_id", String(300)),
    Column("reason", String(80)),
    Column("details", Text),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    # No secondary index: each would cost every record event a random-order B-tree insert (measured: two
    # indexes doubled the audit's CPU per event, bench/audit.py). Searches scan in chain order instead,
    # about 0.4 s per million events on SQLite.
)
checkpoints = Table(
    "audit_checkpoints", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("seq", BigInteger, nullable=False),
    Column("run_id", String(80)),
    Column("body", Text, nullable=False),  # the canonical JSON that was signed
    Column("signature", String(200), nullable=False),
    Column("key_id", String(64), nullable=False),
)
anchors = Table(  # where the live chain starts after a purge: the last archived event's seq and hash
    "audit_anchors", metadata,
    Column("upto_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("body", Text, nullable=False),
    Column("signature", String(200), nullable=False),
    Column("key_id", String(64), nullable=False),
)

_SQLITE_GUARDS = [
    """CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
       BEGIN SELECT RAISE(ABORT, 'audit events are append-only: UPDATE refused'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
       WHEN OLD.seq > (SELECT coalesce(max(upto_seq), 0) FROM audit_anchors)
       BEGIN SELECT RAISE(ABORT, 'audit events are append-only: DELETE refused'); END""",
    *[f"""CREATE TRIGGER IF NOT EXISTS {t}_no_{op.lower()} BEFORE {op} ON {t}
          BEGIN SELECT RAISE(ABORT, '{t} is append-only: {op} refused'); END"""
      for t in ("audit_checkpoints", "audit_anchors") for op in ("UPDATE", "DELETE")],
]

_PG_GUARDS = [
    """CREATE OR REPLACE FUNCTION crmbridge_audit_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'DELETE' AND TG_TABLE_NAME = 'audit_events'
         AND current_setting('crmbridge.audit_purge', true) = 'on'
         AND OLD.seq <= (SELECT coalesce(max(upto_seq), 0) FROM audit_anchors) THEN
        RETURN OLD;
      END IF;
      RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
    END $$""",
    *[stmt for t in ("audit_events", "audit_checkpoints", "audit_anchors") for stmt in (
        f"DROP TRIGGER IF EXISTS {t}_guard ON {t}",
        f"""CREATE TRIGGER {t}_guard BEFORE UPDATE OR DELETE ON {t}
            FOR EACH ROW EXECUTE FUNCTION crmbridge_audit_guard()""",
        f"DROP TRIGGER IF EXISTS {t}_no_truncate ON {t}",
        f"""CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t}
            FOR EACH STATEMENT EXECUTE FUNCTION crmbridge_audit_guard()""",
    )],
]


class AuditStoreError(CrmbridgeError):
    """The audit store could not be opened or written."""


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


class AuditStore:
    """One project's audit events, checkpoints and archive anchors."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite"):
            database = url.split("///", 1)[-1]
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine: Engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        except Exception as error:  # bad URL or missing driver; the URL may hold a password: not echoed
            raise AuditStoreError(f"audit store: cannot open the configured URL ({type(error).__name__})") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            _sqlite_transactions(self.engine)
        self.placeholder = "?" if self.engine.dialect.paramstyle == "qmark" else "%s"
        self._create()

    def _create(self) -> None:
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":  # two processes creating the store at once
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK})
            metadata.create_all(conn)
            guards = _SQLITE_GUARDS
            if self.dialect == "postgresql":
                # Installed once: re-creating a trigger takes an exclusive lock that waits for every reader.
                installed = conn.execute(text("SELECT count(*) FROM pg_trigger WHERE tgrelid IN "
                                              "('audit_events'::regclass, 'audit_checkpoints'::regclass, "
                                              "'audit_anchors'::regclass) AND NOT tgisinternal")).scalar_one()
                guards = [] if installed >= 6 else _PG_GUARDS
            for statement in guards:
                conn.execute(text(statement))

    def close(self) -> None:
        self.engine.dispose()

    # --- writing ------------------------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[Connection]:
        """A transaction that holds the store's append lock until it commits."""
        with self.engine.connect() as conn:
            conn.execution_options(audit_write=True)  # SQLite: BEGIN IMMEDIATE (see _sqlite_transactions)
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK})
                yield conn

    def append(self, build: Callable[[Head], tuple[list[tuple], Head]]) -> Head:
        """Extend the chain: `build` gets the current head and returns rows (in COLUMNS order) and the new
        head. It runs under the append lock, so it must only hash, never wait."""
        with self._locked() as conn:
            head = self._head(conn)
            rows, new_head = build(head)
            if rows:
                marks = ", ".join([self.placeholder] * len(COLUMNS))
                conn.exec_driver_sql(f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES ({marks})", rows)
            return new_head

    def add_checkpoint(self, seq: int, run_id: str | None, body: str, signature: str, key_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(checkpoints.insert().values(seq=seq, run_id=run_id, body=body, signature=signature,
                                                     key_id=key_id))

    def purge_through(self, upto_seq: int, hash_: str, body: str, signature: str, key_id: str) -> int:
        """Record the archive anchor, then delete the events it covers (one transaction)."""
        with self._locked() as conn:
            conn.execute(anchors.insert().values(upto_seq=upto_seq, hash=hash_, body=body, signature=signature,
                                                 key_id=key_id))
            if self.dialect == "postgresql":
                conn.execute(text("SET LOCAL crmbridge.audit_purge = 'on'"))
            return conn.execute(events.delete().where(events.c.seq <= upto_seq)).rowcount

    # --- reading ------------------------------------------------------------------------------------------

    def _head(self, conn: Connection) -> Head:
        row = conn.execute(text("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")).first()
        if row is not None:
            return Head(row[0], row[1])
        anchor = self.anchor(conn)
        return Head(anchor["upto_seq"], anchor["hash"]) if anchor else Head(0, GENESIS)

    def head(self) -> Head:
        with self.engine.connect() as conn:
            return self._head(conn)

    def anchor(self, conn: Connection | None = None) -> dict[str, Any] | None:
        """The latest archive anchor, or None when nothing was ever purged."""
        query = anchors.select().order_by(anchors.c.upto_seq.desc()).limit(1)
        if conn is None:
            with self.engine.connect() as own:
                row = own.execute(query).mappings().first()
        else:
            row = conn.execute(query).mappings().first()
        return dict(row) if row else None

    def rows(self, where: str = "", params: Sequence[Any] = (), first_seq: int | None = None,
             last_seq: int | None = None, chunk: int = 20_000) -> Iterator[tuple]:
        """Event rows (COLUMNS order) in chain order, streamed; `where` is trusted SQL with placeholders."""
        clauses, args = [], list(params)
        if where:
            clauses.append(f"({where})")
        if first_seq is not None:
            clauses.append(f"seq >= {self.placeholder}")
            args.append(first_seq)
        if last_seq is not None:
            clauses.append(f"seq <= {self.placeholder}")
            args.append(last_seq)
        sql = f"SELECT {', '.join(COLUMNS)} FROM audit_events"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY seq"
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).exec_driver_sql(sql, tuple(args))
            while batch := result.fetchmany(chunk):
                yield from (tuple(r) for r in batch)

    def hashes_of_run(self, run_id: str) -> Iterator[tuple[int, str]]:
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True).exec_driver_sql(
                f"SELECT seq, hash FROM audit_events WHERE run_id = {self.placeholder} ORDER BY seq", (run_id,))
            while batch := result.fetchmany(50_000):
                yield from ((r[0], r[1]) for r in batch)

    def checkpoints(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(checkpoints.select().order_by(checkpoints.c.id)).mappings()]

    def hash_at(self, seq: int) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT hash FROM audit_events WHERE seq = :s"), {"s": seq}).scalar()

    def count_of_run(self, run_id: str, upto_seq: int) -> int:
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM audit_events WHERE run_id = :r AND seq <= :s"),
                                {"r": run_id, "s": upto_seq}).scalar_one()

    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM audit_events")).scalar_one()


def _sqlite_transactions(engine: Engine) -> None:
    """pysqlite's own transaction handling defers BEGIN; take the write lock at BEGIN instead, so reading
    the chain head and appending after it cannot interleave with another process."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("audit_write") else "BEGIN")
