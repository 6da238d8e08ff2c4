"""Incremental ERP -> Salesforce sync: the ERP emulator (real SOAP, zeep) into the Salesforce emulator (real
REST, simple-salesforce) through the real `crmbridge-sync` flow. After every cycle the active Accounts in
Salesforce equal the ERP's live customers exactly; deleted customers are deactivated."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from emulators.erp import ErpServer
from emulators.salesforce.fixture import *  # noqa: F403 (fixtures)

from crmbridge.connectors import salesforce as sf_module
from crmbridge.errors import CrmbridgeError
from crmbridge.flows.sync import Watermarks, start_sync
from crmbridge.mappings import load_mapping
from crmbridge.mappings.cleanse import external_id

pytestmark = pytest.mark.prefect
T0 = datetime(2026, 5, 4, 8, 30, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sf_module, "BACKOFF_SECONDS", 0.001)


@pytest.fixture
def erp() -> Iterator[ErpServer]:
    with ErpServer(frozen_at=T0) as server:
        server.upsert(*[customer(i) for i in range(150)])
        yield server


def customer(i: int, name: str | None = None) -> dict:
    return {"Id": f"E{i:05d}", "Name": name or f"Company {i}", "City": ["Hamburg", "Wuhan", "Porto"][i % 3],
            "CreditLimit": Decimal(1000 + i)}


def write_mapping(tmp_path: Path, erp: ErpServer) -> Path:
    path = tmp_path / "erp-to-salesforce.yaml"
    path.write_text(f"""version: 1
name: erp-to-salesforce
settings: {{batch_size: 60, state_dir: state}}
sources:
  erp:
    type: soap
    wsdl: {erp.wsdl_url}
    changes_operation: GetChangedCustomers
    page_size: 25
    retries: 0
    timezone: UTC
targets:
  salesforce:
    type: salesforce
    instance_url: ${{SF_INSTANCE_URL}}
    session_id: ${{SF_SESSION_ID}}
    ca_bundle: ${{SF_CA_BUNDLE}}
    retries: 6
entities:
  - name: accounts
    source: erp
    key: Id
    target: salesforce
    target_table: Account
    external_id: Legacy_Id__c
    fields:
      Name: {{from: Name, required: true, max_length: 255}}
      BillingCity: {{from: Address.City, max_length: 40}}
      Credit_Limit__c: {{from: CreditLimit, type: decimal}}
      Active__c: {{value: true, type: boolean}}
    sync:
      watermark: ModifiedAt
      overlap: 120
      deleted_flag: Deleted
      deletes: deactivate
      active_field: Active__c
""", encoding="utf-8")
    return path


def salesforce_state(store) -> dict[str, tuple]:
    accounts = list(store.records["Account"].values())
    assert len({a["Legacy_Id__c"] for a in accounts}) == len(accounts)  # no duplicates
    return {a["Legacy_Id__c"]: (a["Name"], a.get("BillingCity"), Decimal(str(a["Credit_Limit__c"])))
            for a in accounts if a.get("Active__c")}


def erp_state(erp: ErpServer) -> dict[str, tuple]:
    return {external_id("erp", "accounts", key): (r["Name"], r["City"], Decimal(r["CreditLimit"]))
            for key, r in erp.live().items()}


def cycle(path: Path) -> dict:
    return start_sync(path)["entities"][0]


def test_erp_to_salesforce_cycles_match_the_erp_after_each_cycle(tmp_path, erp, salesforce_env):
    store = salesforce_env.store
    path = write_mapping(tmp_path, erp)
    assert cycle(path)["created"] == 150
    assert salesforce_state(store) == erp_state(erp)

    # Same second as the watermark: updates and inserts; then deletes and updates a second later.
    erp.upsert(*[customer(i, f"Renamed {i}") for i in range(0, 40, 4)], *[customer(i) for i in range(150, 165)])
    second = cycle(path)
    assert (second["created"], second["updated"]) == (15, 10)
    assert salesforce_state(store) == erp_state(erp)

    erp.frozen_at = T0 + timedelta(seconds=1)
    erp.delete(*[f"E{i:05d}" for i in range(50, 62)])
    erp.upsert(*[customer(i, f"Again {i}") for i in range(100, 110)])
    third = cycle(path)
    assert (third["updated"], third["deleted"]) == (10, 12)
    assert salesforce_state(store) == erp_state(erp)
    assert len(store.records["Account"]) == 165  # deactivated, not deleted

    # A cycle that dies midway (the ERP faults on a later page of changes) stores no watermark; the next
    # cycle loads everything.
    erp.frozen_at = T0 + timedelta(seconds=2)
    erp.upsert(*[customer(i, f"Third {i}") for i in range(0, 165, 2)])
    erp.fail("GetChangedCustomers", after=1)
    with pytest.raises(CrmbridgeError, match="GetChangedCustomers"):
        cycle(path)
    assert Watermarks(load_mapping(path).state_dir).get("accounts") == T0 + timedelta(seconds=1)
    recovered = cycle(path)
    assert recovered["updated"] >= 70
    assert salesforce_state(store) == erp_state(erp)
    quiet = cycle(path)
    assert (quiet["created"], quiet["updated"], quiet["deleted"]) == (0, 0, 0)
