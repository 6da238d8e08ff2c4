"""The emulator speaks the real wire protocol: the real simple-salesforce client talks to it over HTTPS, and
it enforces what Salesforce enforces (types, lengths, required fields, picklists, external ids)."""

from __future__ import annotations

import csv
import io

import pytest
import requests
from emulators.salesforce.fixture import *  # noqa: F403 (fixtures)
from simple_salesforce.exceptions import (
    SalesforceExpiredSession,
    SalesforceGeneralError,
    SalesforceMalformedRequest,
    SalesforceRefusedRequest,
)


def _upsert(client, sobject: str, records: list[dict]) -> list[dict]:
    body = {"allOrNone": False, "records": [{"attributes": {"type": sobject}, **r} for r in records]}
    return client.restful(f"composite/sobjects/{sobject}/Legacy_Id__c", method="PATCH", json=body)


def test_plain_http_and_wrong_session_are_refused(salesforce_emulator) -> None:
    session = requests.Session()
    session.trust_env = False
    with pytest.raises(requests.exceptions.SSLError):  # its certificate is from the test CA only
        session.get(salesforce_emulator.instance_url + "/services/data/v59.0/sobjects/Account/describe")
    session.verify = salesforce_emulator.ca_path
    answer = session.get(salesforce_emulator.instance_url + "/services/data/v59.0/sobjects/Account/describe",
                         headers={"Authorization": "Bearer wrong"})
    assert answer.status_code == 401 and answer.json()[0]["errorCode"] == "INVALID_SESSION_ID"


def test_describe_reports_types_required_and_external_ids(salesforce_client) -> None:
    fields = {f["name"]: f for f in salesforce_client.Contact.describe()["fields"]}
    assert fields["LastName"]["nillable"] is False and fields["LastName"]["length"] == 80
    assert fields["Legacy_Id__c"]["externalId"] is True
    assert fields["AccountId"]["relationshipName"] == "Account"
    assert fields["AccountId"]["referenceTo"] == ["Account"]
    assert "erp" in [p["value"] for p in fields["Source_System__c"]["picklistValues"]]


def test_upsert_links_parents_by_external_id_and_is_idempotent(salesforce_client, salesforce_emulator) -> None:
    first = _upsert(salesforce_client, "Account", [{"Legacy_Id__c": "A#1", "Name": "Acme"}])
    assert first[0]["success"] and first[0]["created"] is True
    again = _upsert(salesforce_client, "Account", [{"Legacy_Id__c": "A#1", "Name": "Acme Ltd"}])
    assert again[0]["created"] is False and again[0]["id"] == first[0]["id"]
    child = _upsert(salesforce_client, "Contact", [{"Legacy_Id__c": "C1", "LastName": "Li",
                                                     "Account": {"Legacy_Id__c": "A#1"}}])
    assert child[0]["success"]
    found = salesforce_client.query("SELECT Id, Account.Legacy_Id__c, Account.Name FROM Contact")
    assert found["records"][0]["Account"]["Legacy_Id__c"] == "A#1"
    assert found["records"][0]["Account"]["Name"] == "Acme Ltd"
    assert len(salesforce_emulator.store.records["Account"]) == 1


@pytest.mark.parametrize(("record", "code"), [
    ({"Legacy_Id__c": "x"}, "REQUIRED_FIELD_MISSING"),
    ({"Legacy_Id__c": "x", "LastName": "L" * 81}, "STRING_TOO_LONG"),
    ({"Legacy_Id__c": "x", "LastName": "L", "Email": "not-an-address"}, "INVALID_EMAIL_ADDRESS"),
    ({"Legacy_Id__c": "x", "LastName": "L", "Source_System__c": "fax"}, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"),
    ({"Legacy_Id__c": "x", "LastName": "L", "Birthdate": "2024-01-02T00:00:00Z"}, "INVALID_TYPE_ON_FIELD_IN_RECORD"),
    ({"Legacy_Id__c": "x", "LastName": "L", "Account": {"Legacy_Id__c": "nope"}}, "INVALID_FIELD"),
    ({"Legacy_Id__c": "x", "LastName": "L", "AccountId": "001000000000009999"}, "INVALID_CROSS_REFERENCE_KEY"),
])
def test_records_are_refused_like_salesforce_does(salesforce_client, record, code) -> None:
    result = _upsert(salesforce_client, "Contact", [record, {"Legacy_Id__c": "ok", "LastName": "Fine"}])
    assert result[0]["success"] is False and result[0]["errors"][0]["statusCode"] == code
    assert result[1]["success"] is True  # allOrNone=false: the good record of the batch is saved


def test_unknown_field_refuses_the_whole_request(salesforce_client) -> None:
    with pytest.raises(SalesforceMalformedRequest) as error:
        _upsert(salesforce_client, "Contact", [{"Legacy_Id__c": "x", "LastName": "L", "Nickname__c": "y"}])
    assert error.value.content[0]["errorCode"] == "INVALID_FIELD"


def test_more_than_200_records_per_collection_call_are_refused(salesforce_client) -> None:
    with pytest.raises(SalesforceMalformedRequest) as error:
        _upsert(salesforce_client, "Account", [{"Legacy_Id__c": str(i), "Name": "n"} for i in range(201)])
    assert error.value.content[0]["errorCode"] == "EXCEEDED_ID_LIMIT"


def test_query_pages_through_next_records_url(salesforce_client, salesforce_emulator) -> None:
    salesforce_emulator.store.page_size = 7
    _upsert(salesforce_client, "Account", [{"Legacy_Id__c": f"a{i:02d}", "Name": "n"} for i in range(20)])
    first = salesforce_client.query("SELECT Legacy_Id__c FROM Account ORDER BY Legacy_Id__c")
    assert first["done"] is False and len(first["records"]) == 7 and first["totalSize"] == 20
    every = salesforce_client.query_all("SELECT Legacy_Id__c FROM Account ORDER BY Legacy_Id__c")["records"]
    assert [r["Legacy_Id__c"] for r in every] == [f"a{i:02d}" for i in range(20)]
    picked = salesforce_client.query("SELECT Id FROM Account WHERE Legacy_Id__c IN ('a03', 'a05') OR "
                                     "(Legacy_Id__c = 'a07' AND Name = 'n')")
    assert picked["totalSize"] == 3


def test_bulk_ingest_job_reports_per_row_results_and_nulls(salesforce_client, salesforce_emulator) -> None:
    _upsert(salesforce_client, "Account", [{"Legacy_Id__c": "P", "Name": "Parent", "Phone": "123"}])
    job = salesforce_client.restful("jobs/ingest", method="POST", json={
        "object": "Account", "operation": "upsert", "externalIdFieldName": "Legacy_Id__c", "contentType": "CSV"})
    data = "Legacy_Id__c,Name,Phone\nP,Parent,#N/A\nQ,,555\nR,New,\n"
    url = f"{salesforce_client.base_url}jobs/ingest/{job['id']}/batches"
    salesforce_client._call_salesforce("PUT", url, data=data.encode(), headers={"Content-Type": "text/csv"})
    salesforce_client.restful(f"jobs/ingest/{job['id']}", method="PATCH", json={"state": "UploadComplete"})
    assert salesforce_client.restful(f"jobs/ingest/{job['id']}")["state"] == "JobComplete"
    ok_text = salesforce_client._call_salesforce("GET", f"{salesforce_client.base_url}jobs/ingest/{job['id']}/"
                                                 "successfulResults").text
    failed_text = salesforce_client._call_salesforce("GET", f"{salesforce_client.base_url}jobs/ingest/"
                                                     f"{job['id']}/failedResults").text
    ok = list(csv.DictReader(io.StringIO(ok_text)))
    failed = list(csv.DictReader(io.StringIO(failed_text)))
    assert [(r["Legacy_Id__c"], r["sf__Created"]) for r in ok] == [("P", "false"), ("R", "true")]
    assert failed[0]["Legacy_Id__c"] == "Q" and failed[0]["sf__Error"].startswith("REQUIRED_FIELD_MISSING:")
    parent = salesforce_client.query("SELECT Phone FROM Account WHERE Legacy_Id__c = 'P'")["records"][0]
    assert parent["Phone"] is None  # #N/A clears a field; an empty cell leaves it alone


def test_faults_arrive_as_the_real_api_sends_them(salesforce_client, salesforce_emulator) -> None:
    store = salesforce_emulator.store
    store.inject("rate_limit")
    with pytest.raises(SalesforceRefusedRequest) as refused:
        salesforce_client.query("SELECT Id FROM Account")
    assert refused.value.content[0]["errorCode"] == "REQUEST_LIMIT_EXCEEDED"
    store.inject("expired_session")
    with pytest.raises(SalesforceExpiredSession):
        salesforce_client.query("SELECT Id FROM Account")
    store.inject("server_error")
    with pytest.raises(SalesforceGeneralError):
        salesforce_client.query("SELECT Id FROM Account")
    store.inject("lock", rows=1)
    result = _upsert(salesforce_client, "Account", [{"Legacy_Id__c": "a", "Name": "n"},
                                                     {"Legacy_Id__c": "b", "Name": "n"}])
    assert result[0]["errors"][0]["statusCode"] == "UNABLE_TO_LOCK_ROW" and result[1]["success"]
    assert salesforce_client.query("SELECT Id FROM Account")["totalSize"] == 1
    assert salesforce_client.api_usage["api-usage"].used == store.api_used  # Sforce-Limit-Info


def test_daily_limit_refuses_every_call(salesforce_client, salesforce_emulator) -> None:
    salesforce_emulator.store.api_limit = salesforce_emulator.store.api_used + 1
    salesforce_client.query("SELECT Id FROM Account")
    with pytest.raises(SalesforceRefusedRequest):
        salesforce_client.query("SELECT Id FROM Account")
