"""Scale-out: the batch stages run on a local Dask cluster of two worker processes through Prefect's Dask
task runner, and the result is the one a single process gives: same reconciliation, same target rows."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import DEMO_MAPPING, _load_generator
from prefect.settings import PREFECT_API_URL, temporary_settings

from crmbridge.flows.migrate import start_run

pytest.importorskip("prefect_dask", reason="scale-out needs prefect-dask (pip install 'crmbridge[dask]')")
pytestmark = pytest.mark.prefect


def _project(where: Path) -> Path:
    where.mkdir()
    shutil.copy(DEMO_MAPPING, where / "mapping.yaml")
    _load_generator().generate(where, customers=600, contacts=1500, partners=120)
    return where


def _target(project: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(project / "data" / "target_crm.db") as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("account", "contact")}


def test_a_dask_run_equals_the_single_process_run(tmp_path: Path, prefect_server: str) -> None:
    single, distributed = _project(tmp_path / "single"), _project(tmp_path / "dask")
    for project in (single, distributed):  # small batches: many in flight at once
        mapping = project / "mapping.yaml"
        text = mapping.read_text(encoding="utf-8")
        assert "batch_size: 500\n" in text
        mapping.write_text(text.replace("batch_size: 500\n", "batch_size: 150\n", 1), encoding="utf-8")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):  # one the workers can reach
        _, expected = start_run(single / "mapping.yaml")
        run, got = start_run(distributed / "mapping.yaml", dask="local:2")
        tasks = _task_runs(run.manifest().flow_run_id)
    assert got["entities"] == expected["entities"]
    assert all(e["balanced"] for e in got["entities"])
    assert _target(distributed) == _target(single)  # target-numbered keys too: those writes go in order
    assert len(_target(single)["contact"]) > 1000
    # Preparing and writing ran as Dask tasks (one per batch); loading in the flow process never did.
    loaded = sum(e["created"] + e["updated"] for e in got["entities"])
    assert len(tasks["prepare"]) >= sum(e["source"] for e in got["entities"]) // 150
    assert len(tasks["write"]) >= loaded // 150
    assert not tasks["load"] and not tasks["stage"]
    assert {state for names in tasks.values() for state in names.values()} == {"COMPLETED"}


def _task_runs(flow_run_id: str) -> dict[str, dict[str, str]]:
    """The flow run's task runs by kind (the task run name's first word): name -> state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    kinds: dict[str, dict[str, str]] = {"prepare": {}, "write": {}, "load": {}, "stage": {}}
    for task_run in runs:
        kinds.setdefault(task_run.name.split("-")[0], {})[task_run.name] = task_run.state.type.value
    return kinds


def test_protected_fields_travel_to_the_writers_sealed(tmp_path: Path, prefect_server: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A plaintext target gets the same rows from Dask writers as from a single process, yet the write jobs
    that cross to the workers hold envelopes: each worker decrypts at the last moment."""
    import base64
    import os

    from test_protection_demo import protect_demo

    from crmbridge.flows import steps
    from crmbridge.protection.keyring import Keyring, MasterKeySealer

    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("DEMO_MASTER_KEY", key)  # the workers inherit it: they decrypt
    single, distributed = _project(tmp_path / "single"), _project(tmp_path / "dask")
    for project in (single, distributed):
        protect_demo(project, "plaintext")
        Keyring.create(project / "keys" / "keyring.json", MasterKeySealer.from_text(key))
    distributed_keys = (distributed / "keys" / "keyring.json")
    distributed_keys.write_bytes((single / "keys" / "keyring.json").read_bytes())  # same keys, same tokens

    jobs: list[steps.WriteJob] = []
    plan_load = steps.plan_load

    def capture(*args, **kwargs):
        plan = plan_load(*args, **kwargs)
        if plan.job is not None:
            jobs.append(plan.job)
        return plan

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        start_run(single / "mapping.yaml")
        monkeypatch.setattr(steps, "plan_load", capture)
        _, got = start_run(distributed / "mapping.yaml", dask="local:2")
    assert all(e["balanced"] for e in got["entities"])
    assert _target(distributed) == _target(single)

    contact_jobs = [job for job in jobs if "first_name" in job.columns]
    assert contact_jobs and all(job.decrypt == ["first_name", "last_name", "email", "phone"] for job in contact_jobs)
    received = {row[1]: row for row in _target(single)["contact"]}  # by external id
    sealed = [(ext, value) for job in contact_jobs
              for ext, value in zip(job.columns["external_id"], job.columns["first_name"], strict=True) if value]
    assert len(sealed) > 1000
    assert not any(value in received[ext] for ext, value in sealed)  # never the value the target holds


def test_dedupe_spreads_by_blocking_key_and_merges_as_one_process_does(tmp_path: Path, prefect_server: str) -> None:
    """Each blocking rule's rows go to workers in parts (whole blocks each); the merges, the lineage and the
    target are the single process's."""
    import duckdb
    from test_dedupe_run import _project as people_project

    single, distributed = tmp_path / "single", tmp_path / "dask"
    single.mkdir(), distributed.mkdir()
    mapping = people_project(distributed)  # scale-out chosen in the mapping this time
    mapping.write_text(mapping.read_text(encoding="utf-8").replace(
        "version: 1\n", "version: 1\nsettings:\n  dask: local:2\n", 1), encoding="utf-8")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        single_run, expected = start_run(people_project(single))
        run, got = start_run(mapping)
        tasks = _task_runs(run.manifest().flow_run_id)
    assert got["entities"] == expected["entities"] and got["entities"][0]["merged"] == 3
    assert len(tasks["dedupe"]) >= 3 and set(tasks["dedupe"].values()) == {"COMPLETED"}  # dedupe-part-*
    lineage = "SELECT source_key, survivor_key, rule, score FROM dedupe_lineage ORDER BY 1"
    with duckdb.connect(str(single_run.staging_path), read_only=True) as con:
        expected_lineage = con.execute(lineage).fetchall()
    with duckdb.connect(str(run.staging_path), read_only=True) as con:
        assert con.execute(lineage).fetchall() == expected_lineage
    with sqlite3.connect(single / "target.db") as a, sqlite3.connect(distributed / "target.db") as b:
        query = "SELECT * FROM contact ORDER BY external_id"
        assert a.execute(query).fetchall() == b.execute(query).fetchall()


def test_the_cli_runs_on_dask_under_its_progress_bars(tmp_path: Path, prefect_server: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`crmbridge run --dask`: Prefect ships the flow function to the workers by value, with the globals it
    reads; the live progress display (locks, a terminal) must not be one of them."""
    from typer.testing import CliRunner

    from crmbridge.cli.main import app

    project = _project(tmp_path / "cli")
    monkeypatch.chdir(project)
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    result = CliRunner().invoke(app, ["run", "mapping.yaml", "--dask", "local:2"])
    assert result.exit_code == 0, result.output
    assert "Reconciliation" in result.output and "yes" in result.output and "no " not in result.output
    assert len(_target(project)["contact"]) > 1000
