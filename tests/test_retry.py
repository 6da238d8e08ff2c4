"""Transient faults are retried with backoff and jitter; permanent ones fail at once.

Against the real servers: the target's connection is killed from another session between two batches (as a
database restart or a network cut does), and the next batch still lands, exactly once.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_sql_connector import kind_of, make_mapping, opened_target

from crmbridge.connectors import sql as sql_connector
from crmbridge.errors import TargetError
from crmbridge.retry import Backoff, GaveUp, retrying


class Flaky:
    def __init__(self, failures: list[BaseException]):
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def test_transient_faults_are_retried_with_growing_jittered_waits() -> None:
    waits: list[float] = []
    reconnects: list[int] = []
    call = Flaky([TimeoutError(), TimeoutError(), TimeoutError()])
    result = retrying(call, transient=lambda e: isinstance(e, TimeoutError), what="test",
                      backoff=Backoff(attempts=5, base=1.0, cap=3.0), sleep=waits.append,
                      before_retry=lambda: reconnects.append(1))
    assert result == "done" and call.calls == 4 and len(reconnects) == 3
    assert [w <= bound for w, bound in zip(waits, [1.0, 2.0, 3.0], strict=True)] == [True] * 3


def test_a_permanent_fault_is_not_retried() -> None:
    call = Flaky([ValueError("bad"), TimeoutError()])
    with pytest.raises(ValueError):
        retrying(call, transient=lambda e: isinstance(e, TimeoutError), what="test", sleep=lambda _: None)
    assert call.calls == 1


def test_giving_up_keeps_the_last_fault() -> None:
    last = TimeoutError("third")
    call = Flaky([TimeoutError(), TimeoutError(), last])
    with pytest.raises(GaveUp) as caught:
        retrying(call, transient=lambda e: isinstance(e, TimeoutError), what="test",
                 backoff=Backoff(attempts=3), sleep=lambda _: None)
    assert caught.value.attempts == 3 and caught.value.last is last and call.calls == 3


def test_full_jitter_stays_below_the_capped_exponential_bound() -> None:
    backoff, rng = Backoff(base=0.5, cap=4.0), random.Random(1)
    for retry in range(8):
        delays = [backoff.delay(retry, rng) for _ in range(200)]
        bound = min(4.0, 0.5 * 2 ** retry)
        assert min(delays) >= 0 and max(delays) <= bound
        assert max(delays) > bound / 2  # really spread out, not a constant


def _kill_connection(url: str, target) -> None:
    """End the target's session from another connection, as a restart or a network cut would."""
    kind = kind_of(url)
    own = target.conn.exec_driver_sql(
        "SELECT pg_backend_pid()" if kind == "postgresql" else "SELECT CONNECTION_ID()").scalar()
    target.conn.rollback()
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_terminate_backend({own})" if kind == "postgresql" else f"KILL {own}")
    admin.dispose()


@pytest.mark.parametrize("server", ["postgres", "mariadb"])
def test_a_dropped_target_connection_is_retried_and_the_batch_lands_once(
        server: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = request.getfixturevalue(f"{server}_url")
    monkeypatch.setattr(sql_connector, "BACKOFF", Backoff(attempts=3, base=0.05))
    mapping = make_mapping(tmp_path, url, {"name": {"from": "name"}})
    entity = mapping.entities[0]
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=False)
        assert target.write(entity, [{"external_id": f"a{i}", "name": f"first {i}"} for i in range(50)]) == []
        _kill_connection(url, target)
        assert target.write(entity, [{"external_id": f"b{i}", "name": f"second {i}"} for i in range(50)]) == []
        _kill_connection(url, target)
        existing = target.fetch_existing(entity, [f"a{i}" for i in range(50)] + [f"b{i}" for i in range(50)])
    assert len(existing) == 100
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*), count(DISTINCT external_id) FROM people").one() == (100, 100)
    engine.dispose()


def test_a_busy_sqlite_target_is_retried_then_reported_with_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sql_connector, "BACKOFF", Backoff(attempts=3, base=0.01))
    db = tmp_path / "target.db"
    mapping = make_mapping(tmp_path, f"sqlite:///{db}?timeout=0", {"name": {"from": "name"}})
    entity = mapping.entities[0]
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=False)
        blocker = sqlite3.connect(db, timeout=0)
        blocker.execute("BEGIN EXCLUSIVE")  # another program holds the database
        try:
            with pytest.raises(TargetError) as caught:
                target.write(entity, [{"external_id": "x", "name": "someone"}])
        finally:
            blocker.rollback()
            blocker.close()
        message = str(caught.value)
        assert "write on target `db` failed 3 times with a transient fault" in message
        assert "crmbridge resume" in message and "someone" not in message
        assert target.write(entity, [{"external_id": "x", "name": "someone"}]) == []  # free again: it lands


def test_a_permanent_target_fault_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(sql_connector, "BACKOFF", Backoff(attempts=5, base=10.0))
    monkeypatch.setattr("crmbridge.retry.time.sleep", calls.append)
    mapping = make_mapping(tmp_path, f"sqlite:///{tmp_path / 't.db'}", {"name": {"from": "name"}})
    entity = mapping.entities[0]
    with opened_target(mapping) as target:
        target.prepare(entity, dry_run=False)
        target.conn.exec_driver_sql("DROP TABLE people")
        target.conn.commit()
        with pytest.raises(sa.exc.OperationalError):  # no such table: not transient, never retried
            target.fetch_existing(entity, ["x"])
    assert calls == []
