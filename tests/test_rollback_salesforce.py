"""Rolling back a run into Salesforce (the emulator, through the real simple-salesforce client and the Prefect
flow): created accounts and contacts deleted, updated fields restored, a record edited in Salesforce after the
run reported and left alone; a second rollback does nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from emulators.salesforce.fixture import *  # noqa: F403 (fixtures)

from crmbridge.connectors import salesforce as sf_module
from crmbridge.flows.migrate import start_run
from crmbridge.flows.rollback import apply_rollback, plan_rollback
from crmbridge.staging import Staging

pytestmark = pytest.mark.prefect
SF_MAPPING = Path(__file__).parent / "emulators" / "salesforce" / "demo_mapping.yaml"
VOLATILE = {"LastModifiedDate", "SystemModstamp", "CreatedDate"}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sf_module, "BACKOFF_SECONDS", 0.001)


def _live(store) -> dict[str, dict[str, dict]]:
    """Every record not in the recycle bin, by table and external id, without the system time stamps."""
    return {table: {r["Legacy_Id__c"]: {k: v for k, v in r.items() if k not in VOLATILE}
                    for r in store.records[table].values() if not r.get("IsDeleted")}
            for table in ("Account", "Contact")}


def test_a_salesforce_run_rolls_back(demo_project: Path, salesforce_env) -> None:
    mapping = demo_project / "mapping.yaml"
    shutil.copy(SF_MAPPING, mapping)
    store = salesforce_env.store
    start_run(mapping)
    first = _live(store)

    # Upper-case names (updates every account) and a default for blank ones (creates the accounts the first run
    # quarantined, and the contacts that pointed at them).
    text = mapping.read_text(encoding="utf-8")
    changed = text.replace("transform: [collapse_whitespace, title]\n        required: true\n        max_length: 255",
                           "transform: [collapse_whitespace, upper, {default: Unnamed}]\n        required: true\n"
                           "        max_length: 255", 1)
    assert changed != text
    mapping.write_text(changed, encoding="utf-8")
    run, result = start_run(mapping)
    counts = {row["entity"]: row for row in result["entities"]}
    assert counts["accounts"]["updated"] > 50 and counts["accounts"]["created"] > 0
    assert counts["contacts"]["created"] > 0

    staging = Staging(run.staging_path)
    try:
        ledger = staging.ledger_frame("accounts")
    finally:
        staging.close()
    edited = ledger[ledger.action == "updated"].external_id.iloc[0]
    record = next(r for r in store.records["Account"].values() if r["Legacy_Id__c"] == edited)
    record["BillingCity"] = "Edited In Salesforce"  # an edit after the run, straight in the org

    plan = plan_rollback(run).as_dict()
    assert [(c["entity"], c["external_id"], c["fields"]) for c in plan["conflicts"]] == \
        [("accounts", edited, ["BillingCity"])]

    report = apply_rollback(run).as_dict()
    rows = {row["entity"]: row for row in report["entities"]}
    assert rows["contacts"]["deleted"] == counts["contacts"]["created"]
    assert rows["accounts"]["deleted"] == counts["accounts"]["created"]
    assert rows["accounts"]["restored"] == counts["accounts"]["updated"] - 1 and rows["accounts"]["skipped"] == 1
    assert all(row["balanced"] for row in report["entities"])
    after = _live(store)
    assert after["Contact"] == first["Contact"]
    assert {k: v for k, v in after["Account"].items() if k != edited} == \
        {k: v for k, v in first["Account"].items() if k != edited}
    assert after["Account"][edited]["BillingCity"] == "Edited In Salesforce"  # left alone, with the run's name
    assert after["Account"][edited]["Name"] != first["Account"][edited]["Name"]
    assert apply_rollback(run).as_dict()["this_attempt"] == {"skipped": 1}  # a second rollback does nothing
