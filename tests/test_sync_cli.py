"""`crmbridge sync` and `crmbridge schedule`: one cycle from the command line, and a cron deployment served on
a real Prefect server whose run `crmbridge schedule list` then shows."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from emulators.erp import ErpServer
from typer.testing import CliRunner

from crmbridge.cli.main import app
from crmbridge.cli.sync_cmd import build_deployment

pytestmark = pytest.mark.prefect
CRMBRIDGE = str(Path(sys.executable).with_name("crmbridge"))
T0 = datetime(2026, 2, 2, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def erp() -> Iterator[ErpServer]:
    with ErpServer(frozen_at=T0) as server:
        server.upsert(*[{"Id": f"P{i:03d}", "Name": f"Partner {i}", "Email": f"p{i}@example.net"}
                        for i in range(30)])
        yield server


def write_mapping(tmp_path: Path, erp: ErpServer) -> Path:
    path = tmp_path / "sync.yaml"
    path.write_text(f"""version: 1
name: cli-sync
settings: {{state_dir: state}}
sources:
  erp: {{type: soap, wsdl: "{erp.wsdl_url}", changes_operation: GetChangedCustomers, retries: 0, timezone: UTC}}
targets:
  crm: {{type: sql, url: "sqlite:///{tmp_path / 'crm.db'}"}}
entities:
  - name: partners
    source: erp
    key: Id
    target: crm
    target_table: partners
    create_table: true
    fields:
      name: {{from: Name}}
      email: {{from: Email}}
    sync: {{watermark: ModifiedAt, deleted_flag: Deleted, deletes: delete}}
""", encoding="utf-8")
    return path


def test_sync_command_runs_a_cycle_and_reports_it(tmp_path, erp):
    path = write_mapping(tmp_path, erp)
    runner = CliRunner()
    first = runner.invoke(app, ["sync", str(path)])
    assert first.exit_code == 0, first.output
    assert "partners" in first.output and "30" in first.output and "2026-02-02T12:00:00+00:00" in first.output

    erp.delete("P001")
    erp.fail("GetChangedCustomers", code="soap:Server", message="p2@example.net is locked")
    failed = runner.invoke(app, ["sync", str(path)])
    assert failed.exit_code == 1
    assert "operation `GetChangedCustomers` returned SOAP Fault `soap:Server`" in failed.output
    assert "example.net" not in failed.output and "Traceback" not in failed.output

    again = runner.invoke(app, ["sync", str(path)])
    assert again.exit_code == 0, again.output
    import sqlite3

    with sqlite3.connect(tmp_path / "crm.db") as conn:
        assert conn.execute("SELECT count(*) FROM partners").fetchone()[0] == 29


def test_a_migration_reads_the_erp_through_its_list_operation(tmp_path, erp):
    path = write_mapping(tmp_path, erp)
    path.write_text(path.read_text().replace("changes_operation: GetChangedCustomers,",
                                             "list_operation: ListCustomers, paging: page, page_size: 7,"))
    erp.delete("P003")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    import sqlite3

    with sqlite3.connect(tmp_path / "crm.db") as conn:
        rows = dict(conn.execute("SELECT email, name FROM partners").fetchall())
    assert len(rows) == 29 and "p3@example.net" not in rows and rows["p29@example.net"] == "Partner 29"
    assert erp.calls.count("ListCustomers") == 5  # 29 records, 7 per page, the total reached on the 5th


def test_schedule_checks_its_input_before_needing_a_server(tmp_path, erp, monkeypatch):
    monkeypatch.setenv("CRMBRIDGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    path = write_mapping(tmp_path, erp)
    runner = CliRunner()
    bad = runner.invoke(app, ["schedule", str(path), "--cron", "every 15 minutes"])
    assert bad.exit_code == 1 and "is not a cron expression" in bad.output
    missing = runner.invoke(app, ["schedule", str(path)])
    assert missing.exit_code == 1 and "expected --cron" in missing.output
    no_server = runner.invoke(app, ["schedule", str(path), "--cron", "*/15 * * * *"])
    assert no_server.exit_code == 1 and "crmbridge server start" in no_server.output


def test_the_deployment_carries_cron_retries_and_parameters(tmp_path, erp, monkeypatch):
    monkeypatch.setenv("CRMBRIDGE_SYNC_RETRIES", "0")  # restored afterwards: build_deployment sets them
    monkeypatch.setenv("CRMBRIDGE_SYNC_RETRY_DELAY", "60")
    path = write_mapping(tmp_path, erp)
    deployment = build_deployment(path, "cli-sync", "*/15 * * * *", retries=3, retry_delay=30,
                                  webhook="http://127.0.0.1:9/hook")
    assert deployment.name == "cli-sync-sync"
    assert [s.schedule.cron for s in deployment.schedules] == ["*/15 * * * *"]
    assert deployment.parameters == {"mapping_path": str(path), "webhook": "http://127.0.0.1:9/hook"}
    assert deployment.flow_name == "crmbridge-sync"
    assert deployment.concurrency_limit == 1  # an overdue cycle waits for the running one
    assert deployment.entrypoint == "crmbridge.flows.sync.sync_flow"  # importable wherever it is installed
    assert (os.environ["CRMBRIDGE_SYNC_RETRIES"], os.environ["CRMBRIDGE_SYNC_RETRY_DELAY"]) == ("3", "30")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_schedule_serves_on_a_prefect_server_and_list_shows_the_last_run(tmp_path, erp):
    from crmbridge.flows import prefect_env

    home = tmp_path / "home"
    env = {**os.environ, "CRMBRIDGE_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    old_home = os.environ.get("CRMBRIDGE_HOME")
    os.environ["CRMBRIDGE_HOME"] = str(home)
    try:
        info = prefect_env.start_server(_free_port())
    finally:
        os.environ.pop("CRMBRIDGE_HOME") if old_home is None else os.environ.update(CRMBRIDGE_HOME=old_home)
    path = write_mapping(tmp_path, erp)
    erp.fail("GetChangedCustomers", times=1)  # the first attempt fails; the deployment's retry succeeds
    serving = subprocess.Popen([CRMBRIDGE, "schedule", str(path), "--cron", "0 3 * * *", "--retries", "1",
                                "--retry-delay", "0"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        api = {**env, "PREFECT_API_URL": info.api_url}
        trigger = ("from prefect.deployments import run_deployment\n"
                   "run = run_deployment('crmbridge-sync/cli-sync-sync', timeout=180)\n"
                   "print('STATE', run.state.name)\n")
        deadline = time.monotonic() + 120
        while True:  # the served deployment appears once `serve` has registered it
            done = subprocess.run([sys.executable, "-c", trigger], env=api, capture_output=True, text=True,
                                  timeout=240)
            if "STATE" in done.stdout or time.monotonic() > deadline or serving.poll() is not None:
                break
            time.sleep(2)
        assert "STATE Completed" in done.stdout, (done.stdout, done.stderr[-2000:])
        assert erp.calls.count("GetChangedCustomers") >= 1 and not erp._faults[0].times  # it did fail once
        listing = subprocess.run([CRMBRIDGE, "schedule", "list"], env=env, capture_output=True, text=True,
                                 timeout=120)
        assert listing.returncode == 0, listing.stdout + listing.stderr
        text = " ".join(listing.stdout.split())
        assert "cli-sync-sync" in text and "0 3 * * *" in text and "Completed" in text
        import sqlite3

        with sqlite3.connect(tmp_path / "crm.db") as conn:
            assert conn.execute("SELECT count(*) FROM partners").fetchone()[0] == 30
    finally:
        serving.terminate()
        try:
            serving.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serving.kill()
        os.environ["CRMBRIDGE_HOME"] = str(home)
        try:
            prefect_env.stop_server()
        finally:
            os.environ.pop("CRMBRIDGE_HOME") if old_home is None else os.environ.update(CRMBRIDGE_HOME=old_home)
