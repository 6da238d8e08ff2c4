"""The demo's accounts and contacts migrated into the Salesforce emulator through the real Prefect flow:
parents linked by external id, re-runs create nothing, every fault kind survived, reconciliation balances."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from emulators.salesforce.fixture import *  # noqa: F403 (fixtures)

from crmbridge.connectors import salesforce as sf_module
from crmbridge.errors import TargetError
from crmbridge.flows.migrate import resume_run, start_run
from crmbridge.runs import RunDir
from crmbridge.staging import Staging

pytestmark = pytest.mark.prefect
SF_MAPPING = Path(__file__).parent / "emulators" / "salesforce" / "demo_mapping.yaml"


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sf_module, "BACKOFF_SECONDS", 0.001)


@pytest.fixture
def sf_project(demo_project: Path, salesforce_env) -> Path:
    shutil.copy(SF_MAPPING, demo_project / "mapping.yaml")
    return demo_project


def _set_options(project: Path, **options: object) -> None:
    path = project / "mapping.yaml"
    text = path.read_text(encoding="utf-8")
    for key, value in options.items():
        text, found = re.subn(rf"(?m)^    {key}: .*$", f"    {key}: {value}", text)
        if not found:
            text = text.replace("    retries: 6\n", f"    retries: 6\n    {key}: {value}\n")
    path.write_text(text, encoding="utf-8")


def _by_entity(result: dict) -> dict[str, dict]:
    return {row["entity"]: row for row in result["entities"]}


def _check_target(store, result: dict) -> None:
    """Every created/updated/unchanged row is in Salesforce exactly once, each contact under its account."""
    counts = _by_entity(result)
    accounts, contacts = store.records["Account"], store.records["Contact"]
    for entity in ("accounts", "contacts"):
        assert counts[entity]["balanced"], counts[entity]
    loaded = {e: counts[e]["created"] + counts[e]["updated"] + counts[e]["unchanged"] for e in counts}
    assert len(accounts) == loaded["accounts"] and len(contacts) == loaded["contacts"]
    assert len({r["Legacy_Id__c"] for r in contacts.values()}) == len(contacts)  # no duplicates
    assert all(r["AccountId"] in accounts for r in contacts.values())


def _parent_links(run, store) -> None:
    """Each contact's account in Salesforce is the one its legacy row names (through the external ids)."""
    staging = Staging(run.staging_path)
    try:
        ledger = dict(staging.con.execute(
            "SELECT entity || ':' || source_key, external_id FROM ledger").fetchall())
        staged = staging.con.execute('SELECT _ext, "AccountId" FROM "rows_contacts"').fetchall()
    finally:
        staging.close()
    by_ext = {r["Legacy_Id__c"]: r for r in store.records["Contact"].values()}
    ids = {r["Id"]: r["Legacy_Id__c"] for r in store.records["Account"].values()}
    checked = 0
    for ext, account_key in staged:
        if ext in by_ext:
            assert ids[by_ext[ext]["AccountId"]] == ledger[f"accounts:{account_key}"]
            checked += 1
    assert checked == len(by_ext) > 300


def test_demo_migrates_into_salesforce_and_reruns_create_nothing(sf_project: Path, salesforce_env) -> None:
    store = salesforce_env.store
    run, result = start_run(sf_project / "mapping.yaml")
    counts = _by_entity(result)
    assert counts["accounts"]["created"] > 100 and counts["contacts"]["created"] > 300
    usage = result["api_usage"]["salesforce"]  # shown in the run report
    assert usage["calls"] == store.api_used and usage["org_api_used"] == store.api_used
    _check_target(store, result)
    _parent_links(run, store)
    quarantine = run.path / "staging.duckdb"
    assert quarantine.exists()
    record = next(r for r in store.records["Account"].values() if r["Customer_Since__c"])
    assert len(record["Customer_Since__c"]) == 10 and record["Legacy_Created__c"].endswith("+0000")

    before = {o: dict(r) for o, r in store.records.items()}
    _, again = start_run(sf_project / "mapping.yaml")
    for entity, row in _by_entity(again).items():
        assert row["created"] == row["updated"] == 0, row
        assert row["unchanged"] == counts[entity]["created"]
    assert {o: len(r) for o, r in store.records.items()} == {o: len(r) for o, r in before.items()}
    assert all(store.records["Account"][i]["SystemModstamp"] == r["SystemModstamp"]
               for i, r in before["Account"].items())  # not even rewritten

    # An edit made in Salesforce is detected and put back; nothing else changes.
    victim_id, victim = next(iter(store.records["Account"].items()))
    store.records["Account"][victim_id] = {**victim, "Name": "Edited In Salesforce"}
    _, third = start_run(sf_project / "mapping.yaml")
    assert _by_entity(third)["accounts"]["updated"] == 1
    assert store.records["Account"][victim_id]["Name"] == victim["Name"]


@pytest.mark.parametrize("bulk", [False, True], ids=["collections", "bulk"])
def test_every_fault_kind_is_survived_in_a_real_run(sf_project: Path, salesforce_env, bulk) -> None:
    store = salesforce_env.store
    if bulk:
        _set_options(sf_project, bulk_threshold=50)
    on = "jobs/ingest" if bulk else "composite"
    for kind in ("rate_limit", "expired_session", "server_error", "lost_response"):
        store.inject(kind, times=1, on=on)
    store.inject("lock", times=2, rows=7)
    store.inject("reject", times=1, rows=5, code="FIELD_CUSTOM_VALIDATION_EXCEPTION")
    run, result = start_run(sf_project / "mapping.yaml")
    assert not store.faults  # every fault was hit
    _check_target(store, result)
    # refused rows are quarantined with the Salesforce code, never with their values; locked ones were retried
    assert _target_rejected(run) == ["Salesforce FIELD_CUSTOM_VALIDATION_EXCEPTION"] * 5
    _, again = start_run(sf_project / "mapping.yaml")  # the next run loads them; nothing twice
    _check_target(store, again)
    first, second = _by_entity(result), _by_entity(again)
    # the 5 refused rows, plus contacts whose refused account left them unresolved, now load
    created = sum(r["created"] for r in second.values())
    assert created >= 5 and sum(r["updated"] for r in second.values()) == 0
    assert sum(r["quarantined"] for r in second.values()) == sum(r["quarantined"] for r in first.values()) - created


def _target_rejected(run) -> list[str]:
    staging = Staging(run.staging_path)
    try:
        rows = staging.con.execute("SELECT problems FROM quarantine WHERE reason = 'target_rejected'").fetchall()
    finally:
        staging.close()
    return [json.loads(p)[0]["detail"] for (p,) in rows]


def test_api_budget_stops_the_run_cleanly_and_resume_carries_on(sf_project: Path, salesforce_env) -> None:
    store = salesforce_env.store
    _set_options(sf_project, api_budget=8)
    with pytest.raises(TargetError, match="API budget of 8 calls"):
        start_run(sf_project / "mapping.yaml")
    run = RunDir(sorted((sf_project / ".crmbridge" / "runs").iterdir())[-1])
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "stopped cleanly" in manifest["error"]
    assert len(store.records["Account"]) > 0
    # Each resume gets the budget again and carries on from the last loaded batch.
    for _ in range(5):
        try:
            result = resume_run(run)
            break
        except TargetError as error:
            assert "API budget" in str(error)
    else:
        pytest.fail("the run never finished")
    _check_target(store, result)
    counts = _by_entity(result)
    assert counts["accounts"]["created"] == len(store.records["Account"])  # all in this run's ledger, once
    assert result["api_usage"]["salesforce"]["budget"] == 8
