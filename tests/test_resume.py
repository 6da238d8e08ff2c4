"""Kill a run with SIGKILL at random points of every stage, resume it, and check that nothing was lost or
written twice: the target equals the target of an uninterrupted run row for row, and the reconciliation
(created, updated, unchanged, quarantined per entity) is the same.

The runs are real `crmbridge` processes against a persistent local Prefect server started once for the
module (a temporary server per process would cost 5-10 s each). The seed is printed; set
CRMBRIDGE_RESUME_SEED to replay a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crmbridge.failpoints import POINTS
from crmbridge.runs import list_runs

pytestmark = pytest.mark.prefect

BATCH = 400
ACCOUNTS, CONTACTS = 2_000, 4_400

MAPPING = f"""\
version: 1
name: resume-test
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
    table: accounts
    key: id
    target: crm
    target_table: account
    create_table: true
    target_key: id
    fields:
      name: {{from: name, transform: [trim, title], required: true}}
      city: {{from: city, transform: [trim]}}
  - name: contacts
    source: legacy
    table: contacts
    key: id
    target: crm
    target_table: contact
    create_table: true
    fields:
      email: {{from: email, transform: [trim, lower], required: true}}
      account_id: {{from: account_id, ref: accounts}}
"""


def _make_source(path: Path) -> None:
    """Accounts and contacts with some rows that must be quarantined: blank names, duplicate keys, blank
    emails and contacts of accounts that do not exist."""
    rng = random.Random(7)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE accounts (id INTEGER, name TEXT, city TEXT)")  # no key: duplicates possible
    con.execute("CREATE TABLE contacts (id INTEGER, account_id INTEGER, email TEXT)")
    accounts = [(i, "  " if i % 97 == 0 else f" company {i} ", rng.choice(["Beijing", " Shanghai", "Xi'an "]))
                for i in range(ACCOUNTS)]
    accounts += [(i, f"duplicate {i}", "Beijing") for i in range(0, ACCOUNTS, 301)]
    contacts = [(i, rng.randrange(ACCOUNTS + 50), "" if i % 89 == 0 else f" Person{i}@Example.COM ")
                for i in range(CONTACTS)]
    con.executemany("INSERT INTO accounts VALUES (?, ?, ?)", accounts)
    con.executemany("INSERT INTO contacts VALUES (?, ?, ?)", contacts)
    con.commit()
    con.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("resume-template")
    (where / "mapping.yaml").write_text(MAPPING, encoding="utf-8")
    _make_source(where / "source.db")
    return where


def _project(template: Path, where: Path) -> Path:
    where.mkdir()
    for name in ("mapping.yaml", "source.db"):
        shutil.copy(template / name, where / name)
    return where


def _crmbridge(project: Path, *args: str, failpoint: str | None = None,
               kill_after: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": os.environ.get("CI", "")}
    env.pop("CRMBRIDGE_FAILPOINT", None)
    if failpoint:
        env["CRMBRIDGE_FAILPOINT"] = failpoint
    process = subprocess.Popen([sys.executable, "-m", "crmbridge.cli.main", *args], cwd=project, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        output, _ = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def _table(db: Path, name: str) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute(f"SELECT * FROM {name} ORDER BY 1, 2").fetchall()
    finally:
        con.close()


def _counts(project: Path) -> dict:
    run = list_runs(project / ".crmbridge")[-1]
    reconciliation = run.reconciliation()
    assert reconciliation is not None, f"no reconciliation in {run.path}"
    return {e["entity"]: {k: e[k] for k in ("source", "created", "updated", "unchanged", "quarantined",
                                            "balanced", "in_two_buckets")}
            for e in reconciliation["entities"]}


def _outcome(project: Path) -> tuple[dict, dict, str]:
    target = {name: _table(project / "target.db", name) for name in ("account", "contact")}
    return _counts(project), target, list_runs(project / ".crmbridge")[-1].manifest().status


def _logical(url: str) -> dict[str, list[tuple]]:
    """The target without surrogate keys (a server's sequence may skip numbers): each row by its external id,
    and each contact's link as its account's external id."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {
                "account": sorted(conn.execute(sa.text("SELECT external_id, name, city FROM account")).all()),
                "contact": sorted(conn.execute(sa.text(
                    "SELECT c.external_id, c.email, a.external_id FROM contact c "
                    "LEFT JOIN account a ON a.id = CAST(c.account_id AS INTEGER)")).all()),
            }
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def reference(template: Path, tmp_path_factory: pytest.TempPathFactory, prefect_server: str) -> dict:
    """One uninterrupted run: what every interrupted-and-resumed run must end up as."""
    project = _project(template, tmp_path_factory.mktemp("reference") / "project")
    started = time.perf_counter()
    done = _crmbridge(project, "run", "mapping.yaml")
    assert done.returncode == 0, done.stdout
    counts, target, status = _outcome(project)
    assert status == "succeeded"
    assert all(c["balanced"] for c in counts.values())
    assert counts["accounts"]["quarantined"] > 0 and counts["contacts"]["quarantined"] > 0
    return {"counts": counts, "target": target, "seconds": time.perf_counter() - started, "project": project}


def _hits(point: str) -> int:
    """How often an uninterrupted run of the test mapping reaches a fail point."""
    staged = -(-(ACCOUNTS + len(range(0, ACCOUNTS, 301))) // BATCH) + -(-CONTACTS // BATCH)
    loaded = -(-ACCOUNTS // BATCH) + -(-CONTACTS // BATCH)  # at most: quarantined rows shrink the last
    return {"stage.after_batch": staged, "stage.after_entity": 2, "dedupe.after": 2, "load.before_write": loaded,
            "load.after_write": loaded, "load.after_ledger": loaded, "reconcile.before": 1}[point]


def _scenarios() -> list[tuple[str, str | None, float | None]]:
    seed = int(os.environ.get("CRMBRIDGE_RESUME_SEED", time.time_ns() % 1_000_000))
    print(f"kill-and-resume seed: {seed} (CRMBRIDGE_RESUME_SEED={seed} replays it)")
    rng = random.Random(seed)
    cases: list[tuple[str, str | None, float | None]] = []
    for point in POINTS:  # every crash point at least once, at a random hit
        hit = rng.randint(1, max(1, _hits(point) - (1 if point.startswith("load") else 0)))
        cases.append((f"{point}:{hit}", f"{point}:{hit}", None))
    for i in range(3):  # and a few kills at a random moment, wherever the run happens to be
        cases.append((f"timer-{i}", None, rng.uniform(0.4, 0.95)))
    return cases


SCENARIOS = _scenarios()


@pytest.mark.parametrize(("name", "failpoint", "fraction"), SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_a_killed_run_resumes_to_the_same_result(name: str, failpoint: str | None, fraction: float | None,
                                                 template: Path, reference: dict, tmp_path: Path) -> None:
    project = _project(template, tmp_path / "project")
    kill_after = None if fraction is None else fraction * reference["seconds"]
    killed = _crmbridge(project, "run", "mapping.yaml", failpoint=failpoint, kill_after=kill_after)
    if killed.returncode == 0:  # a timer that fired after the run ended: nothing to resume
        assert fraction is not None, killed.stdout
        return
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    runs = list_runs(project / ".crmbridge")
    if not runs:  # a timer that fired before the run began: nothing was written
        assert fraction is not None and not (project / "target.db").exists()
        return
    if runs[-1].manifest().status == "succeeded":  # killed while the process was exiting: nothing to resume
        assert fraction is not None
        assert _outcome(project)[:2] == (reference["counts"], reference["target"])
        return
    run_id = runs[-1].run_id
    assert runs[-1].manifest().status == "running"  # died without a word

    resumed = _crmbridge(project, "resume", run_id)
    assert resumed.returncode == 0, resumed.stdout
    counts, target, status = _outcome(project)
    assert status == "succeeded"
    assert len(list_runs(project / ".crmbridge")) == 1  # resumed in place, not a new run
    assert counts == reference["counts"]
    assert target == reference["target"]
    _assert_external_ids_indexed(f"sqlite:///{project / 'target.db'}")
    _assert_audit_verifies(project)


def _assert_external_ids_indexed(url: str) -> None:
    """The contact table, which the run creates and indexes once loaded, has its unique external-id index
    however the run was killed (the account table numbers its rows: unique from the start)."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        inspector = sa.inspect(engine)
        extra = {"include_auto_indexes": True} if engine.dialect.name == "sqlite" else {}
        for table in ("account", "contact"):
            unique = [i["column_names"] for i in inspector.get_indexes(table, **extra) if i.get("unique")]
            unique += [c["column_names"] for c in inspector.get_unique_constraints(table)]
            assert ["external_id"] in unique, table
    finally:
        engine.dispose()


def _assert_audit_verifies(project: Path) -> None:
    """The audit chain a killed process left behind (and the resume appended to) still verifies."""
    from typer.testing import CliRunner

    from crmbridge.cli.main import app

    verified = CliRunner().invoke(app, ["audit", "verify", str(project / "mapping.yaml")])
    assert verified.exit_code == 0, verified.output
    assert "verified:" in verified.output
    # Lineage is complete: every row the run created or updated has its record-level event (at least once:
    # a batch loaded again on resume sends its events again).
    run = list_runs(project / ".crmbridge")[-1]
    counts = _counts(project)
    with sqlite3.connect(project / ".crmbridge" / "audit.db") as con:
        recorded = dict(con.execute(
            "SELECT entity, count(DISTINCT source_ref) FROM audit_events WHERE run_id = ? "
            "AND action IN ('record_created', 'record_updated') GROUP BY entity", (run.run_id,)).fetchall())
    assert recorded == {e: c["created"] + c["updated"] for e, c in counts.items() if c["created"] + c["updated"]}


def test_a_run_killed_twice_still_resumes_and_resume_refuses_what_it_cannot_do(
        template: Path, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from crmbridge.cli.main import app

    project = _project(template, tmp_path / "project")
    assert _crmbridge(project, "run", "mapping.yaml", failpoint="stage.after_batch:3").returncode == -9
    run_id = list_runs(project / ".crmbridge")[-1].run_id
    assert _crmbridge(project, "resume", run_id, failpoint="load.after_write:2").returncode == -9

    monkeypatch.chdir(project)  # the refusals happen before any flow starts: checked in this process
    mapping = project / "mapping.yaml"
    original = mapping.read_text(encoding="utf-8")
    mapping.write_text(original.replace(f"batch_size: {BATCH}", "batch_size: 300"), encoding="utf-8")
    refused = CliRunner().invoke(app, ["resume", run_id])
    assert refused.exit_code == 1
    assert "changed since run" in refused.output and "restore it to resume" in refused.output
    mapping.write_text(original, encoding="utf-8")
    unknown = CliRunner().invoke(app, ["resume", "20990101"])
    assert unknown.exit_code == 1 and "no run `20990101`" in unknown.output

    resumed = _crmbridge(project, "resume", run_id)
    assert resumed.returncode == 0, resumed.stdout
    counts, target, _ = _outcome(project)
    assert counts == reference["counts"]
    assert target == reference["target"]
    assert len(list_runs(project / ".crmbridge")[-1].manifest().resumed) == 2
    _assert_audit_verifies(project)
    again = CliRunner().invoke(app, ["resume", run_id])
    assert again.exit_code == 1 and "nothing to resume" in again.output


def test_a_run_into_postgresql_killed_after_a_committed_batch_resumes_exactly_once(
        template: Path, reference: dict, tmp_path: Path, postgres_url: str) -> None:
    project = _project(template, tmp_path / "project")
    mapping = project / "mapping.yaml"
    mapping.write_text(mapping.read_text(encoding="utf-8").replace("sqlite:///target.db", postgres_url),
                       encoding="utf-8")
    killed = _crmbridge(project, "run", "mapping.yaml", failpoint="load.after_write:3")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    resumed = _crmbridge(project, "resume", list_runs(project / ".crmbridge")[-1].run_id)
    assert resumed.returncode == 0, resumed.stdout
    assert _counts(project) == reference["counts"]
    expected = _logical(f"sqlite:///{reference['project'] / 'target.db'}")
    assert _logical(postgres_url) == expected
    _assert_external_ids_indexed(postgres_url)
    assert all(link is not None for _, _, link in expected["contact"])
