"""The Salesforce target against the emulator: collections vs Bulk 2.0, per-row results, parent links by
external id, type conversion, API limits and faults, and the describe() checks."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest
from emulators.salesforce.fixture import *  # noqa: F403 (fixtures)

from crmbridge.connectors import connector_for
from crmbridge.connectors import salesforce as sf_module
from crmbridge.connectors.salesforce_api import ApiLimitReached
from crmbridge.connectors.salesforce_auth import login_arguments
from crmbridge.errors import TargetError
from crmbridge.mappings import load_mapping
from crmbridge.values import RowBatch

MAPPING = """
version: 1
name: sf-target-test
sources:
  files: {type: csv, path: data.csv, timezone: Asia/Shanghai}
targets:
  sf:
    type: salesforce
    instance_url: ${SF_INSTANCE_URL}
    session_id: ${SF_SESSION_ID}
    ca_bundle: ${SF_CA_BUNDLE}
    bulk_threshold: 50
    retries: 4
EXTRA
entities:
  - name: accounts
    source: files
    key: id
    target: sf
    target_table: Account
    external_id: Legacy_Id__c
    fields:
      Name: {from: name, required: true, max_length: 255}
      Phone: {from: phone, max_length: 40}
      Credit_Limit__c: {from: credit, type: decimal}
      Customer_Since__c: {from: since, type: date}
      Legacy_Created__c: {from: created, type: timestamp}
      Active__c: {from: active, type: boolean}
  - name: contacts
    source: files
    key: id
    target: sf
    target_table: Contact
    external_id: Legacy_Id__c
    fields:
      AccountId: {from: account, ref: accounts}
      LastName: {from: name, required: true, max_length: 80}
      Email: {from: email, max_length: 80}
"""


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sf_module, "BACKOFF_SECONDS", 0.001)


def _target(tmp_path: Path, extra: str = ""):
    (tmp_path / "data.csv").write_text("id,name,phone,credit,since,created,active,account,email\n")
    path = tmp_path / "mapping.yaml"
    path.write_text(MAPPING.replace("EXTRA", extra), encoding="utf-8")
    mapping = load_mapping(path)
    target = connector_for(mapping.targets["sf"], mapping).open_target()
    for entity in mapping.entities:
        target.prepare(entity, dry_run=False)
    return mapping, target


def _accounts(n: int, start: int = 0, **overrides) -> RowBatch:
    columns = {
        "Legacy_Id__c": [f"acc-{i}" for i in range(start, start + n)],
        "Name": [f"Company {i}" for i in range(start, start + n)],
        "Phone": ["5550100"] * n,
        "Credit_Limit__c": [Decimal("1234.50")] * n,
        "Customer_Since__c": [dt.date(2020, 2, 29)] * n,
        # 08:30 in Shanghai is 00:30 UTC the same day; 07:30 in Shanghai is 23:30 UTC the day before
        "Legacy_Created__c": [dt.datetime(2021, 3, 1, 7, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))] * n,
        "Active__c": [True] * n,
    }
    columns.update(overrides)
    return RowBatch(columns)


def _contacts(n: int, parent: str | None = "acc-0") -> RowBatch:
    return RowBatch({"Legacy_Id__c": [f"con-{i}" for i in range(n)], "AccountId": [parent] * n,
                     "LastName": [f"Person {i}" for i in range(n)], "Email": [f"p{i}@example.com" for i in range(n)]})


def _calls(store, fragment: str) -> int:
    return sum(1 for _, path in store.requests if fragment in path)


@pytest.mark.parametrize(("rows", "path"), [(30, "composite/sobjects"), (120, "jobs/ingest")])
def test_writes_go_through_collections_or_bulk_by_size(tmp_path, salesforce_env, rows, path) -> None:
    mapping, target = _target(tmp_path)
    accounts = mapping.entity("accounts")
    assert target.write(accounts, _accounts(rows)) == []
    store = salesforce_env.store
    assert len(store.records["Account"]) == rows
    assert _calls(store, path) > 0
    other = "jobs/ingest" if path == "composite/sobjects" else "composite/sobjects"
    assert _calls(store, other) == 0
    record = next(iter(store.records["Account"].values()))
    assert record["Customer_Since__c"] == "2020-02-29"  # a date is never shifted by a zone
    assert record["Legacy_Created__c"] == "2021-02-28T23:30:00.000+0000"  # converted to UTC explicitly
    assert record["Credit_Limit__c"] == 1234.5 and record["Active__c"] is True
    # Read back, the values compare equal to what was written: a re-run finds them unchanged.
    existing = target.fetch_existing(accounts, ["acc-0"])["acc-0"]
    assert existing.values["Customer_Since__c"] == dt.date(2020, 2, 29)
    assert existing.values["Legacy_Created__c"] == dt.datetime(2021, 2, 28, 23, 30, tzinfo=dt.UTC)
    assert existing.target_key == "acc-0"


@pytest.mark.parametrize("rows", [3, 60])
def test_null_clears_a_field_in_collections_and_bulk(tmp_path, salesforce_env, rows) -> None:
    mapping, target = _target(tmp_path)
    accounts = mapping.entity("accounts")
    target.write(accounts, _accounts(rows))
    assert target.write(accounts, _accounts(rows, Phone=[None] * rows, Credit_Limit__c=[None] * rows)) == []
    for record in salesforce_env.store.records["Account"].values():
        assert record["Phone"] is None and record["Credit_Limit__c"] is None and record["Name"]


@pytest.mark.parametrize("rows", [5, 60])
def test_children_link_to_parents_by_external_id(tmp_path, salesforce_env, rows) -> None:
    mapping, target = _target(tmp_path)
    target.write(mapping.entity("accounts"), _accounts(1))
    before = len(salesforce_env.store.requests)
    assert target.write(mapping.entity("contacts"), _contacts(rows)) == []
    # no look-up of the parent: only the write calls themselves
    assert not any("query" in path for _, path in salesforce_env.store.requests[before:])
    store = salesforce_env.store
    account_id = next(iter(store.records["Account"]))
    assert {r["AccountId"] for r in store.records["Contact"].values()} == {account_id}
    existing = target.fetch_existing(mapping.entity("contacts"), ["con-0"])
    assert existing["con-0"].values["AccountId"] == "acc-0"  # compared as the parent's external id


@pytest.mark.parametrize("rows", [4, 60])
def test_refused_rows_come_back_with_the_salesforce_code_and_no_values(tmp_path, salesforce_env, rows) -> None:
    mapping, target = _target(tmp_path)
    names = [f"Company {i}" for i in range(rows)]
    names[1] = None  # required
    phones = ["5550100"] * rows
    phones[2] = "9" * 41  # too long
    failures = target.write(mapping.entity("accounts"), _accounts(rows, Name=names, Phone=phones))
    assert {(f.external_id, f.detail) for f in failures} == {
        ("acc-1", "Salesforce REQUIRED_FIELD_MISSING on Name"), ("acc-2", "Salesforce STRING_TOO_LONG on Phone")}
    assert all("9999" not in f.detail for f in failures)
    assert len(salesforce_env.store.records["Account"]) == rows - 2


@pytest.mark.parametrize("kind", ["rate_limit", "expired_session", "server_error", "lost_response"])
@pytest.mark.parametrize("rows", [30, 120])
def test_request_faults_are_survived_without_loss_or_duplicates(tmp_path, salesforce_env, kind, rows) -> None:
    mapping, target = _target(tmp_path)
    store = salesforce_env.store
    store.inject(kind, times=2, on="composite" if rows < 50 else "jobs/ingest")
    assert target.write(mapping.entity("accounts"), _accounts(rows)) == []
    assert len(store.records["Account"]) == rows
    assert len({r["Legacy_Id__c"] for r in store.records["Account"].values()}) == rows
    assert not store.faults  # every injected fault was hit
    assert target.api.retries + target.api.reauths >= 1
    if kind == "expired_session":
        assert target.api.reauths == 2


@pytest.mark.parametrize("rows", [30, 120])
def test_locked_rows_are_retried_serially(tmp_path, salesforce_env, rows) -> None:
    mapping, target = _target(tmp_path)
    store = salesforce_env.store
    store.inject("lock", rows=10)
    assert target.write(mapping.entity("accounts"), _accounts(rows)) == []
    assert len(store.records["Account"]) == rows


def test_a_partial_batch_failure_reports_only_the_refused_rows(tmp_path, salesforce_env) -> None:
    mapping, target = _target(tmp_path)
    salesforce_env.store.inject("reject", rows=3, code="FIELD_CUSTOM_VALIDATION_EXCEPTION")
    failures = target.write(mapping.entity("accounts"), _accounts(120))
    assert [f.detail for f in failures] == ["Salesforce FIELD_CUSTOM_VALIDATION_EXCEPTION"] * 3
    assert len(salesforce_env.store.records["Account"]) == 117


def test_the_api_budget_stops_before_a_batch_it_cannot_finish(tmp_path, salesforce_env) -> None:
    mapping, target = _target(tmp_path, "    api_budget: 6\n")
    target.write(mapping.entity("accounts"), _accounts(20))  # 1 call (describe took 2)
    used = target.api.calls
    with pytest.raises(ApiLimitReached, match="API budget of 6 calls") as stop:
        target.write(mapping.entity("accounts"), _accounts(800, start=20))  # bulk: needs ~8 calls
    assert "stopped cleanly" in str(stop.value)
    assert target.api.calls == used  # nothing of the refused batch was sent
    assert len(salesforce_env.store.records["Account"]) == 20


def test_the_orgs_daily_quota_stops_the_run(tmp_path, salesforce_env) -> None:
    mapping, target = _target(tmp_path)
    store = salesforce_env.store
    store.api_limit = store.api_used + 1
    target.write(mapping.entity("accounts"), _accounts(5))  # the last call the quota allows
    with pytest.raises(ApiLimitReached, match="daily API quota"):
        target.write(mapping.entity("accounts"), _accounts(5, start=5))
    assert target.api.usage()["org_api_used"] == target.api.usage()["org_api_limit"]


def test_describe_check_names_every_mismatch(tmp_path, salesforce_env) -> None:
    bad = MAPPING.replace("      Phone: {from: phone, max_length: 40}\n",
                          "      Phone: {from: phone, max_length: 50}\n      Fax__c: {from: phone}\n"
                          "      Rating: {value: Lukewarm}\n      Employees__c: {from: phone, type: date}\n")
    bad = bad.replace("      LastName: {from: name, required: true, max_length: 80}\n", "")
    bad = bad.replace("    external_id: Legacy_Id__c\n    fields:\n      AccountId",
                      "    external_id: MailingCity\n    fields:\n      AccountId")
    (tmp_path / "data.csv").write_text("id\n")
    (tmp_path / "mapping.yaml").write_text(bad.replace("EXTRA", ""), encoding="utf-8")
    mapping = load_mapping(tmp_path / "mapping.yaml")
    target = connector_for(mapping.targets["sf"], mapping).open_target()
    with pytest.raises(TargetError) as accounts:
        target.prepare(mapping.entity("accounts"), dry_run=False)
    text = str(accounts.value)
    assert "field `Fax__c` does not exist on Account" in text
    assert "field `Phone` holds at most 40 characters" in text
    assert "restricted picklist" in text
    assert "field `Employees__c` is int on Account; the mapping sends date" in text
    with pytest.raises(TargetError) as contacts:
        target.prepare(mapping.entity("contacts"), dry_run=False)
    assert "`MailingCity` is not marked as an External ID" in str(contacts.value)
    assert "required field `LastName` of Contact is not mapped" in str(contacts.value)


def test_login_arguments_for_every_auth_method(tmp_path) -> None:
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    assert login_arguments({"session_id": "s", "instance_url": "https://x"}, tmp_path) == {
        "version": "59.0", "session_id": "s", "instance_url": "https://x"}
    password = login_arguments({"username": "u", "password": "p", "security_token": "t", "domain": "test"},
                               tmp_path)
    assert password == {"version": "59.0", "domain": "test", "username": "u", "password": "p",
                        "security_token": "t"}
    jwt = login_arguments({"username": "u", "consumer_key": "k", "private_key_file": "key.pem"}, tmp_path)
    assert jwt["privatekey_file"] == str(tmp_path / "key.pem") and jwt["consumer_key"] == "k"
    client = login_arguments({"consumer_key": "k", "consumer_secret": "s", "domain": "acme.my"}, tmp_path)
    assert client == {"version": "59.0", "domain": "acme.my", "consumer_key": "k", "consumer_secret": "s"}
    with pytest.raises(TargetError, match="no Salesforce credentials"):
        login_arguments({"username": "u"}, tmp_path)
    with pytest.raises(TargetError, match="does not exist"):
        login_arguments({"consumer_key": "k", "private_key_file": "missing.pem"}, tmp_path)


def test_bulk_results_match_non_ascii_external_ids(tmp_path, salesforce_env) -> None:
    mapping, target = _target(tmp_path)
    ids = [f"客户-{i}" for i in range(60)]
    failures = target.write(mapping.entity("accounts"), _accounts(60, Legacy_Id__c=ids, Name=["北京贸易"] * 60))
    assert failures == []
    assert set(target._ids["accounts"]) == set(ids)
    assert {r["Name"] for r in salesforce_env.store.records["Account"].values()} == {"北京贸易"}


def test_rollback_operations_delete_restore_and_recreate(tmp_path, salesforce_env) -> None:
    from crmbridge.connectors.base import RestoreRow, ReversibleTarget

    mapping, target = _target(tmp_path)
    assert isinstance(target, ReversibleTarget)
    accounts = mapping.entity("accounts")
    target.write(accounts, _accounts(5))
    store = salesforce_env.store
    assert target.restore(accounts, [RestoreRow("acc-1", None, {"Name": "Old Name", "Phone": None})]) == []
    restored = next(r for r in store.records["Account"].values() if r["Legacy_Id__c"] == "acc-1")
    assert restored["Name"] == "Old Name" and restored["Phone"] is None
    assert restored["Customer_Since__c"] == "2020-02-29"  # fields not restored stay as they are
    assert target.delete(accounts, [RestoreRow("acc-2", None, {}), RestoreRow("acc-9", None, {})]) == []
    live = {r["Legacy_Id__c"] for r in store.records["Account"].values() if not r["IsDeleted"]}
    assert live == {"acc-0", "acc-1", "acc-3", "acc-4"}
    assert target.delete(accounts, [RestoreRow("acc-2", None, {})]) == []  # already gone: not a failure
    assert target.recreate(accounts, [RestoreRow("acc-2", None, {"Name": "Back"})]) == []
    back = [r for r in store.records["Account"].values() if r["Legacy_Id__c"] == "acc-2" and not r["IsDeleted"]]
    assert len(back) == 1 and back[0]["Name"] == "Back"


def test_target_key_id_links_children_by_salesforce_id(tmp_path, salesforce_env) -> None:
    text = MAPPING.replace("    external_id: Legacy_Id__c\n    fields:\n      Name:",
                           "    external_id: Legacy_Id__c\n    target_key: Id\n    fields:\n      Name:")
    (tmp_path / "data.csv").write_text("id\n")
    (tmp_path / "mapping.yaml").write_text(text.replace("EXTRA", ""), encoding="utf-8")
    mapping = load_mapping(tmp_path / "mapping.yaml")
    target = connector_for(mapping.targets["sf"], mapping).open_target()
    for entity in mapping.entities:
        target.prepare(entity, dry_run=False)
    target.write(mapping.entity("accounts"), _accounts(2))
    keys = target.target_keys(mapping.entity("accounts"), ["acc-0", "acc-1"])
    store = salesforce_env.store
    assert keys == {r["Legacy_Id__c"]: r["Id"] for r in store.records["Account"].values()}
    assert target.write(mapping.entity("contacts"), _contacts(3, parent=keys["acc-1"])) == []
    assert {r["AccountId"] for r in store.records["Contact"].values()} == {keys["acc-1"]}
    existing = target.fetch_existing(mapping.entity("contacts"), ["con-0"])["con-0"]
    assert existing.values["AccountId"] == keys["acc-1"]
    target.api._sf = None  # a fresh process would not have the write results: keys come from a query
    target._ids.clear()
    assert target.target_keys(mapping.entity("accounts"), ["acc-0"]) == {"acc-0": keys["acc-0"]}
