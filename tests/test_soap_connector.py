"""The SOAP connector with the real zeep client against the local ERP emulator (tests/emulators/erp)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from emulators.erp import ErpServer

from crmbridge.connectors import connector_for
from crmbridge.connectors.base import RestoreRow
from crmbridge.errors import MappingError, SourceError, TargetError
from crmbridge.mappings import load_mapping

FIELDS = """    fields:
      name: {from: Name}
      city: {from: Address.City}
      credit_limit: {from: CreditLimit, type: decimal}
"""


@pytest.fixture
def erp() -> Iterator[ErpServer]:
    with ErpServer() as server:
        server.upsert(*[{"Id": f"C{i:03d}", "Name": f"Name {i}", "City": f"City {i % 7}",
                         "CreditLimit": Decimal("100.25") + i} for i in range(1, 24)])
        yield server


def write_mapping(tmp_path: Path, erp: ErpServer, extra: str = "", fields: str = FIELDS) -> Path:
    path = tmp_path / "mapping.yaml"
    path.write_text(f"""version: 1
name: erp-test
sources:
  erp:
    type: soap
    wsdl: {erp.wsdl_url}
    list_operation: ListCustomers
    changes_operation: GetChangedCustomers
    get_operation: GetCustomers
    upsert_operation: UpsertCustomers
    delete_operation: DeleteCustomers
    page_size: 5
    timezone: UTC
{extra}targets:
  erp_out:
    type: soap
    wsdl: {erp.wsdl_url}
    get_operation: GetCustomers
    upsert_operation: UpsertCustomers
    delete_operation: DeleteCustomers
entities:
  - name: customers
    source: erp
    key: Id
    target: erp_out
    target_table: Customer
    external_id: Id
{fields}""", encoding="utf-8")
    return path


def read_all(path: Path, columns: list[str] | None = None, batch_size: int = 7):
    mapping = load_mapping(path)
    entity = mapping.entities[0]
    source = connector_for(mapping.sources["erp"], mapping).open_source(entity)
    batches = list(source.read(columns or ["Id", "Name", "Address.City", "CreditLimit"], batch_size))
    return source, batches


@pytest.mark.parametrize("paging", ["page", "offset", "token"])
def test_every_paging_style_reads_every_record_once_with_nested_fields_flattened(tmp_path, erp, paging):
    path = write_mapping(tmp_path, erp, f"    paging: {paging}\n")
    source, batches = read_all(path)
    rows = [row for b in batches for row in b.frame.to_dict("records")]
    assert [len(b.frame) for b in batches] == [7, 7, 7, 2]
    assert sorted(r["Id"] for r in rows) == [f"C{i:03d}" for i in range(1, 24)]
    first = next(r for r in rows if r["Id"] == "C003")
    assert first == {"Id": "C003", "Name": "Name 3", "Address.City": "City 3", "CreditLimit": Decimal("103.25")}
    assert list(batches[1].row_numbers) == list(range(8, 15))
    assert erp.calls.count("ListCustomers") == 5  # 23 records, 5 per page
    types = {c.name: c.type for c in source.columns()}
    assert types["Address.City"] == "string" and types["CreditLimit"] == "decimal"
    assert types["ModifiedAt"] == "timestamp" and types["Deleted"] == "boolean"


def test_changes_since_a_timestamp_include_tombstones(tmp_path, erp):
    path = write_mapping(tmp_path, erp)
    mapping = load_mapping(path)
    connector = connector_for(mapping.sources["erp"], mapping)
    mark = erp.now()
    time.sleep(1.05)
    erp.upsert({"Id": "C002", "Name": "Renamed"})
    erp.delete("C005")
    source = connector.open_changes(mapping.entities[0], mark.replace(microsecond=0) + (erp.now() - mark))
    rows = [r for b in source.read(["Id", "Name", "Deleted"], 100) for r in b.frame.to_dict("records")]
    assert sorted((r["Id"], r["Deleted"]) for r in rows) == [("C002", False), ("C005", True)]


@pytest.mark.parametrize(("paging", "skipped"), [("token", set()), ("offset", {"C006"})])
def test_records_changing_between_pages_are_not_skipped_with_token_paging(tmp_path, erp, paging, skipped):
    """A continuation token is a keyset, so a record that moves to the end while a cycle pages through the
    changes shifts nothing past it. Offset paging skips one (which is why `token` is the default)."""
    mapping = load_mapping(write_mapping(tmp_path, erp, f"    paging: {paging}\n"))
    erp.frozen_at = erp.now()  # freeze: every record so far has an older or equal timestamp
    source = connector_for(mapping.sources["erp"], mapping).open_changes(mapping.entities[0], None)

    def change_after_first_page(operation: str, calls: int) -> None:
        if calls == 1:
            erp.frozen_at = erp.frozen_at + timedelta(seconds=1)
            erp.upsert({"Id": "C002", "Name": "moved to the end"})

    erp.on_call = change_after_first_page
    seen = [r["Id"] for b in source.read(["Id", "Name"], 100) for r in b.frame.to_dict("records")]
    expected = {f"C{i:03d}" for i in range(1, 24)}
    assert expected - set(seen) == skipped
    assert seen[-1] == "C002"


def test_a_response_with_a_dtd_is_refused(tmp_path, erp):
    erp.evil_response = True
    with pytest.raises(SourceError, match=r"operation `ListCustomers`: refused a response with DTD") as caught:
        read_all(write_mapping(tmp_path, erp))
    assert "boom" not in str(caught.value)


def test_a_soap_fault_names_the_operation_and_code_but_not_the_fault_text(tmp_path, erp):
    erp.fail("ListCustomers", code="soap:Server", message="Customer jane.doe@example.com is locked")
    with pytest.raises(SourceError) as caught:
        read_all(write_mapping(tmp_path, erp))
    message = str(caught.value)
    assert "operation `ListCustomers` returned SOAP Fault `soap:Server`" in message
    assert "jane.doe" not in message
    assert erp.calls == []  # a fault is not retried


def test_transport_failures_are_retried_with_backoff_then_reported(tmp_path, erp):
    erp.fail_transport(2)
    _, batches = read_all(write_mapping(tmp_path, erp, "    retries: 2\n"))
    assert sum(len(b.frame) for b in batches) == 23

    erp.fail_transport(3)
    with pytest.raises(SourceError, match=r"operation `ListCustomers` failed: HTTPError: HTTP 503 after 3 attempts"):
        read_all(write_mapping(tmp_path, erp, "    retries: 2\n"))


def test_a_slow_service_times_out_with_a_clear_error(tmp_path, erp):
    path = write_mapping(tmp_path, erp, "    timeout: 0.3\n    retries: 0\n")
    mapping = load_mapping(path)
    connector = connector_for(mapping.sources["erp"], mapping)
    connector.client  # the WSDL loads while the service is fast  # noqa: B018
    erp.delay = 0.6
    with pytest.raises(SourceError, match=r"operation `ListCustomers` failed: ReadTimeout"):
        list(connector.open_source(mapping.entities[0]).read(["Id"], 10))


def test_ws_security_password_is_sent_but_never_logged_or_shown(tmp_path, erp, caplog, monkeypatch):
    secret = "s3cret-ERP-pw!"
    erp.credentials = ("integration", secret)
    monkeypatch.setenv("ERP_PASSWORD", secret)
    auth = "    username: integration\n    password: ${ERP_PASSWORD}\n"
    with caplog.at_level(logging.DEBUG, logger="zeep"):
        _, batches = read_all(write_mapping(tmp_path, erp, auth))
    assert sum(len(b.frame) for b in batches) == 23
    assert secret.encode() in erp.last_request  # it did travel in the WS-Security header
    envelopes = [r.getMessage() for r in caplog.records if "Envelope" in r.getMessage()]
    assert envelopes, "zeep logged no envelopes: the redaction check would prove nothing"
    assert any("UsernameToken" in text for text in envelopes)
    assert all(secret not in r.getMessage() for r in caplog.records)

    monkeypatch.setenv("ERP_PASSWORD", "wrong-" + secret)
    with pytest.raises(SourceError, match="SOAP Fault `wsse:FailedAuthentication`") as caught:
        read_all(write_mapping(tmp_path, erp, auth))
    assert secret not in str(caught.value)


def test_soap_options_are_checked_when_the_mapping_loads(tmp_path, erp):
    with pytest.raises(MappingError, match=r"sources.erp.paging: expected one of: page, offset, token"):
        load_mapping(write_mapping(tmp_path, erp, "    paging: cursor\n"))
    with pytest.raises(MappingError, match=r"unknown key `page_sise` \(did you mean `page_size`\?\)"):
        load_mapping(write_mapping(tmp_path, erp, "    page_sise: 10\n"))
    text = write_mapping(tmp_path, erp).read_text().replace(f"    wsdl: {erp.wsdl_url}\n", "", 1)
    (tmp_path / "mapping.yaml").write_text(text)
    with pytest.raises(MappingError, match=r"sources.erp: missing required key `wsdl`"):
        load_mapping(tmp_path / "mapping.yaml")


def test_unknown_operation_lists_the_ones_the_wsdl_has(tmp_path, erp):
    path = write_mapping(tmp_path, erp)
    path.write_text(path.read_text().replace("list_operation: ListCustomers", "list_operation: ListClients"))
    with pytest.raises(SourceError, match=r"no operation `ListClients`; expected one of: DeleteCustomers, "
                                          r"GetChangedCustomers, GetCustomers, ListCustomers, UpsertCustomers"):
        read_all(path)


def test_the_erp_as_a_target_upserts_compares_and_deletes(tmp_path, erp):
    mapping = load_mapping(write_mapping(tmp_path, erp))
    entity = mapping.entities[0]
    target = connector_for(mapping.targets["erp_out"], mapping).open_target()
    target_entity = _entity_with_wsdl_fields(entity)
    target.prepare(target_entity, dry_run=False)
    # A soap target's fields are the WSDL's paths, so the record is written nested (Address.City -> Address/City).
    assert target.write(entity, []) == []
    erp_rows = [{"Id": "N1", "Name": "New one", "Address.City": "Lyon", "CreditLimit": Decimal("5.5")},
                {"Id": "C001", "Name": "Name 1 changed", "Address.City": None, "CreditLimit": Decimal("101.25")}]
    assert target.write(target_entity, erp_rows) == []
    live = erp.live()
    assert live["N1"]["Name"] == "New one" and live["N1"]["City"] == "Lyon"
    assert live["C001"]["Name"] == "Name 1 changed" and live["C001"]["City"] == "City 1"  # None leaves it
    existing = target.fetch_existing(target_entity, ["N1", "C002", "missing"])
    assert set(existing) == {"N1", "C002"}
    assert existing["C002"].values == {"Name": "Name 2", "Address.City": "City 2", "CreditLimit": Decimal("102.25")}
    assert target.delete(target_entity, [RestoreRow("N1", "N1", {}), RestoreRow("gone", None, {})]) == []
    assert "N1" not in erp.live()


def test_a_record_the_erp_refuses_is_isolated(tmp_path, erp):
    mapping = load_mapping(write_mapping(tmp_path, erp))
    target = connector_for(mapping.targets["erp_out"], mapping).open_target()
    entity = _entity_with_wsdl_fields(mapping.entities[0])
    erp.fail("UpsertCustomers", code="soap:Client", times=2)  # the batch of 3, then its first half (1 row)
    rows = [{"Id": f"R{i}", "Name": f"R {i}", "Address.City": None, "CreditLimit": None} for i in range(3)]
    failures = target.write(entity, rows)
    assert [(f.external_id, f.reason) for f in failures] == [("R0", "target_rejected")]
    assert "SOAP Fault `soap:Client`" in failures[0].detail
    assert {"R1", "R2"} <= set(erp.live())


def test_a_target_without_the_fields_fails_prepare_clearly(tmp_path, erp):
    mapping = load_mapping(write_mapping(tmp_path, erp))
    target = connector_for(mapping.targets["erp_out"], mapping).open_target()
    with pytest.raises(TargetError, match=r"operation `UpsertCustomers` takes no field\(s\) `name`, `city`"):
        target.prepare(mapping.entities[0], dry_run=False)


def _entity_with_wsdl_fields(entity):
    from dataclasses import replace

    from crmbridge.mappings.model import FieldSpec

    fields = {name: FieldSpec(name, name, type=kind) for name, kind in
              (("Name", "string"), ("Address.City", "string"), ("CreditLimit", "decimal"))}
    return replace(entity, fields=fields)


def test_a_wsdl_file_is_found_relative_to_the_mapping(tmp_path, erp):
    import shutil

    from emulators.erp.server import WSDL

    (tmp_path / "wsdl").mkdir()
    shutil.copy(WSDL, tmp_path / "wsdl" / "customers.wsdl")
    path = write_mapping(tmp_path, erp)
    path.write_text(path.read_text().replace(f"wsdl: {erp.wsdl_url}", "wsdl: wsdl/customers.wsdl", 1))
    mapping = load_mapping(path)
    source = connector_for(mapping.sources["erp"], mapping).open_source(mapping.entities[0])
    assert "Address.Country" in {c.name for c in source.columns()}
    assert erp.calls == []  # the file, not the service
