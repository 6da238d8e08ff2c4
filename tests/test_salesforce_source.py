"""The Salesforce source: SOQL extract streamed by REST pages or Bulk API 2.0 result pages, parent fields,
deleted records on request."""

from __future__ import annotations

from pathlib import Path

import pytest
from emulators.salesforce.fixture import *  # noqa: F403 (fixtures)

from crmbridge.connectors import connector_for
from crmbridge.flows.steps import check_source_schema
from crmbridge.mappings import load_mapping

MAPPING = """
version: 1
name: sf-source-test
sources:
  org:
    type: salesforce
    instance_url: ${SF_INSTANCE_URL}
    session_id: ${SF_SESSION_ID}
    ca_bundle: ${SF_CA_BUNDLE}
OPTIONS
targets:
  db: {type: sql, url: "sqlite:///out.db"}
entities:
  - name: contacts
    source: org
    table: Contact
    key: Legacy_Id__c
    columns:
      Legacy_Id__c: string
      LastName: string
      Account.Name: string
      Birthdate: date
    target: db
    target_table: contact
    create_table: true
    fields:
      last_name: {from: LastName}
      account: {from: Account.Name}
      born: {from: Birthdate, type: date}
"""


def _seed(client, count: int) -> None:
    accounts = [{"attributes": {"type": "Account"}, "Legacy_Id__c": "A", "Name": "Acme 株式会社"}]
    client.restful("composite/sobjects/Account/Legacy_Id__c", method="PATCH",
                   json={"allOrNone": False, "records": accounts})
    for start in range(0, count, 200):
        records = [{"attributes": {"type": "Contact"}, "Legacy_Id__c": f"c{i:04d}", "LastName": f"L{i}",
                    "Birthdate": "1990-12-31", **({"Account": {"Legacy_Id__c": "A"}} if i % 2 else {})}
                   for i in range(start, min(start + 200, count))]
        client.restful("composite/sobjects/Contact/Legacy_Id__c", method="PATCH",
                       json={"allOrNone": False, "records": records})


def _source(tmp_path: Path, options: str = ""):
    (tmp_path / "mapping.yaml").write_text(MAPPING.replace("OPTIONS", options), encoding="utf-8")
    mapping = load_mapping(tmp_path / "mapping.yaml")
    entity = mapping.entity("contacts")
    connector = connector_for(mapping.sources["org"], mapping)
    return mapping, entity, connector.open_source(entity)


@pytest.mark.parametrize("options", ["    extract: rest\n", "    extract: bulk\n", "", "auto-large"],
                         ids=["rest", "bulk", "auto-small", "auto-large"])
def test_extract_streams_in_batches_with_parent_fields(tmp_path, salesforce_env, salesforce_client,
                                                      options, monkeypatch) -> None:
    from crmbridge.connectors import salesforce as sf_module

    if options == "auto-large":
        monkeypatch.setattr(sf_module, "BULK_EXTRACT_THRESHOLD", 400)  # 450 records: large enough for bulk
        options = ""
    salesforce_env.store.page_size = 150  # REST pages and bulk result pages smaller than a batch
    _seed(salesforce_client, 450)
    mapping, entity, source = _source(tmp_path, options)
    check_source_schema(mapping, entity, source, "emulator")  # the describe() types fit the declared columns
    batches = list(source.read(entity.source_columns, 200))
    assert [len(b.frame) for b in batches] == [200, 200, 50]
    frame = batches[0].frame
    assert list(frame["Legacy_Id__c"][:3]) == ["c0000", "c0001", "c0002"]  # ordered by key: resumable
    assert frame["Account.Name"][0] is None or frame["Account.Name"].isna()[0]
    assert frame["Account.Name"][1] == "Acme 株式会社"
    assert str(frame["Birthdate"][0])[:10] == "1990-12-31"  # a date, not shifted
    assert list(batches[2].row_numbers[:1]) == [401]
    bulk = "bulk" in options or sf_module.BULK_EXTRACT_THRESHOLD == 400
    used_bulk = any("jobs/query" in path for _, path in salesforce_env.store.requests)
    assert used_bulk == bulk
    if not bulk:
        assert sum("query/" in path for _, path in salesforce_env.store.requests) >= 2  # nextRecordsUrl


def test_deleted_records_only_on_request(tmp_path, salesforce_env, salesforce_client) -> None:
    _seed(salesforce_client, 3)
    gone = next(r for r in salesforce_env.store.records["Contact"].values() if r["Legacy_Id__c"] == "c0001")
    salesforce_client.restful(f"composite/sobjects?ids={gone['Id']}", method="DELETE")
    _, entity, source = _source(tmp_path)
    assert list(next(source.read(entity.source_columns, 10)).frame["Legacy_Id__c"]) == ["c0000", "c0002"]
    _, entity, source = _source(tmp_path, "    include_deleted: true\n")
    assert list(next(source.read(entity.source_columns, 10)).frame["Legacy_Id__c"]) == ["c0000", "c0001", "c0002"]


def test_a_missing_field_is_reported_before_reading(tmp_path, salesforce_env) -> None:
    text = MAPPING.replace("LastName", "Surname__c")
    (tmp_path / "mapping.yaml").write_text(text.replace("OPTIONS", ""), encoding="utf-8")
    mapping = load_mapping(tmp_path / "mapping.yaml")
    entity = mapping.entity("contacts")
    source = connector_for(mapping.sources["org"], mapping).open_source(entity)
    with pytest.raises(Exception, match="column `Surname__c` is missing"):
        check_source_schema(mapping, entity, source, "emulator")


def test_changes_page_by_a_compound_cursor_and_never_skip_ties(tmp_path, salesforce_env, salesforce_client) -> None:
    import datetime as dt

    store = salesforce_env.store
    _seed(salesforce_client, 450)  # records written by one call share their SystemModstamp
    mapping, entity, _ = _source(tmp_path)
    connector = connector_for(mapping.sources["org"], mapping)
    stamps = sorted({r["SystemModstamp"] for r in store.records["Contact"].values()})
    assert len(stamps) < 5  # 200 records per timestamp: every batch boundary falls inside a tie
    columns = [*entity.source_columns, "SystemModstamp", "IsDeleted"]
    seen = [k for b in connector.open_changes(entity, None).read(columns, 130) for k in b.frame["Legacy_Id__c"]]
    assert sorted(seen) == sorted(r["Legacy_Id__c"] for r in store.records["Contact"].values())
    assert len(seen) == len(set(seen)) == 450

    # From a stored watermark: everything at or after it (ties included), deleted records as tombstones.
    gone = next(r for r in store.records["Contact"].values() if r["Legacy_Id__c"] == "c0449")
    salesforce_client.restful(f"composite/sobjects?ids={gone['Id']}", method="DELETE")
    last = dt.datetime.fromisoformat(stamps[-1].replace("+0000", "+00:00"))
    changed = list(connector.open_changes(entity, last).read(columns, 1000))
    frame = changed[0].frame
    expected = {r["Legacy_Id__c"] for r in store.records["Contact"].values() if r["SystemModstamp"] >= stamps[-1]}
    assert set(frame["Legacy_Id__c"]) == expected and "c0449" in expected
    assert bool(frame.loc[frame["Legacy_Id__c"] == "c0449", "IsDeleted"].iloc[0]) is True
