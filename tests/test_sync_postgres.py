"""Incremental ERP -> PostgreSQL sync cycles through the real flow (`crmbridge-sync`), the real zeep client
and the ERP emulator: after every cycle the target equals the ERP's live records, exactly."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import sqlalchemy as sa
from emulators.erp import ErpServer

from crmbridge import failpoints
from crmbridge.errors import CrmbridgeError, SourceError
from crmbridge.flows.sync import Watermarks, start_sync
from crmbridge.mappings import load_mapping
from crmbridge.mappings.cleanse import external_id

pytestmark = [pytest.mark.postgres, pytest.mark.prefect]

T0 = datetime(2026, 3, 1, 9, 0, 0, tzinfo=UTC)  # the ERP's clock: months behind this machine's


@pytest.fixture
def erp() -> Iterator[ErpServer]:
    with ErpServer(frozen_at=T0) as server:
        server.upsert(*[customer(i) for i in range(250)])  # all 250 within one second
        yield server


def customer(i: int, name: str | None = None) -> dict:
    return {"Id": f"K{i:05d}", "Name": name or f"Customer {i}", "Email": f"c{i}@example.org",
            "City": ["Berlin", "Lyon", "Shanghai"][i % 3], "CreditLimit": Decimal(i) + Decimal("0.50")}


def write_mapping(tmp_path: Path, erp: ErpServer, url: str, sync: str) -> Path:
    path = tmp_path / "sync.yaml"
    path.write_text(f"""version: 1
name: erp-to-crm
settings: {{batch_size: 100, state_dir: state}}
sources:
  erp:
    type: soap
    wsdl: {erp.wsdl_url}
    list_operation: ListCustomers
    changes_operation: GetChangedCustomers
    paging: token
    page_size: 40
    retries: 0
    timezone: UTC
targets:
  crm: {{type: sql, url: "{url}"}}
entities:
  - name: customers
    source: erp
    key: Id
    target: crm
    target_table: customers
    create_table: true
    fields:
      name: {{from: Name, required: true}}
      email: {{from: Email}}
      city: {{from: Address.City}}
      credit_limit: {{from: CreditLimit, type: decimal}}
      modified_at: {{from: ModifiedAt, type: timestamp}}
      active: {{value: true, type: boolean}}
    sync:
{sync}""", encoding="utf-8")
    return path


def target_state(url: str, only_active: bool = False) -> dict[str, tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT external_id, name, email, city, credit_limit, active "
                                        "FROM customers")).fetchall()
            total, distinct = conn.execute(sa.text(
                "SELECT count(*), count(DISTINCT external_id) FROM customers")).one()
    finally:
        engine.dispose()
    assert total == distinct  # no duplicates
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows if r[5] or not only_active}


def erp_state(erp: ErpServer) -> dict[str, tuple]:
    return {external_id("erp", "customers", key): (r["Name"], r["Email"], r["City"], Decimal(str(r["CreditLimit"])))
            for key, r in erp.live().items()}


def cycle(path: Path, **kwargs) -> dict:
    return start_sync(path, **kwargs)["entities"][0]


def test_cycles_follow_inserts_updates_deletes_ties_and_late_changes(tmp_path, erp, postgres_url):
    path = write_mapping(tmp_path, erp, postgres_url,
                         "      watermark: ModifiedAt\n      overlap: 60\n      deleted_flag: Deleted\n"
                         "      deletes: delete\n")
    first = cycle(path)
    assert (first["created"], first["read"], first["since"]) == (250, 250, None)
    assert first["watermark"] == T0.isoformat()  # the ERP's clock, not this machine's
    assert target_state(postgres_url) == erp_state(erp)

    # Within the watermark's very second, after the cycle read it: updates and inserts that tie with it.
    erp.upsert(*[customer(i, f"Renamed {i}") for i in range(0, 60, 2)], *[customer(i) for i in range(250, 260)])
    second = cycle(path)
    assert (second["created"], second["updated"], second["deleted"]) == (10, 30, 0)
    assert target_state(postgres_url) == erp_state(erp)

    # One second later: deletes, updates and a deleted record that comes back; then a change committed with
    # a timestamp 30 s *before* the watermark (a long transaction, or the ERP clock stepping back).
    erp.frozen_at = T0 + timedelta(seconds=1)
    erp.delete(*[f"K{i:05d}" for i in range(100, 120)])
    erp.upsert(*[customer(i, f"Again {i}") for i in range(200, 215)])
    erp.delete("K00007")
    erp.upsert(customer(7, "Back again"))
    erp.frozen_at = T0 - timedelta(seconds=30)
    erp.upsert(customer(42, "Late commit"))
    third = cycle(path)
    assert (third["deleted"], third["tombstones"]) == (20, 20)
    assert target_state(postgres_url) == erp_state(erp)
    assert target_state(postgres_url)[external_id("erp", "customers", "K00042")][0] == "Late commit"

    quiet = cycle(path)  # nothing changed: every re-read record is unchanged, nothing deleted twice
    assert (quiet["created"], quiet["updated"], quiet["deleted"]) == (0, 0, 0)
    assert quiet["watermark"] == third["watermark"] == (T0 + timedelta(seconds=1)).isoformat()
    assert target_state(postgres_url) == erp_state(erp)
    assert len(erp_state(erp)) == 240


class _Hook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        _Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    server.server_close()


def test_a_cycle_that_fails_midway_loses_nothing_next_time(tmp_path, erp, postgres_url, webhook, monkeypatch):
    path = write_mapping(tmp_path, erp, postgres_url,
                         "      watermark: ModifiedAt\n      overlap: 10\n      deleted_flag: Deleted\n"
                         "      deletes: deactivate\n      active_field: active\n")
    cycle(path)
    store = Watermarks(load_mapping(path).state_dir)
    assert store.get("customers") == T0

    erp.frozen_at = T0 + timedelta(seconds=5)
    erp.upsert(*[customer(i, f"Changed {i}") for i in range(0, 250, 3)])
    erp.delete(*[f"K{i:05d}" for i in range(1, 30, 3)])
    before = target_state(postgres_url)

    # 1. The ERP faults on the third page of changes: nothing loaded, the watermark stays, a webhook fires.
    erp.fail("GetChangedCustomers", code="soap:Server", message="Customer c3@example.org locked", after=2)
    with pytest.raises(SourceError, match="operation `GetChangedCustomers` returned SOAP Fault `soap:Server`"):
        cycle(path, webhook=webhook)
    assert target_state(postgres_url) == before
    assert store.get("customers") == T0
    assert [h["event"] for h in _Hook.received] == ["crmbridge.sync.failed"]
    assert "GetChangedCustomers" in _Hook.received[0]["error"] and "example.org" not in json.dumps(_Hook.received)

    # 2. The process dies after the target committed the first load batch: half the changes are in.
    def crash_after_first_write(name: str) -> None:
        if name == "load.after_write":
            raise CrmbridgeError("simulated crash after the first load batch")

    monkeypatch.setattr(failpoints, "reach", crash_after_first_write)
    with pytest.raises(CrmbridgeError, match="simulated crash"):
        cycle(path)
    partial = target_state(postgres_url)
    assert partial != before and partial != erp_state(erp)
    assert store.get("customers") == T0
    monkeypatch.undo()

    # 3. The next cycle reads the same changes again and completes them; the deletes become deactivations.
    done = cycle(path)
    assert done["deleted"] == 10
    assert target_state(postgres_url, only_active=True) == erp_state(erp)
    assert len(target_state(postgres_url)) == 250  # deactivated, not deleted
    assert store.get("customers") == T0 + timedelta(seconds=5)
    again = cycle(path)
    assert (again["updated"], again["deleted"]) == (0, 0)


def test_newest_wins_keeps_a_newer_edit_made_in_the_target(tmp_path, erp, postgres_url):
    path = write_mapping(tmp_path, erp, postgres_url,
                         "      watermark: ModifiedAt\n      overlap: 0\n      conflicts: newest_wins\n"
                         "      modified_field: modified_at\n")
    cycle(path)
    k1, k2 = external_id("erp", "customers", "K00001"), external_id("erp", "customers", "K00002")
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:  # a CRM user edits K00001 after the ERP's next change, K00002 before it
        conn.execute(sa.text("UPDATE customers SET name = 'CRM edit', modified_at = :t WHERE external_id = :k"),
                     [{"t": T0 + timedelta(minutes=5), "k": k1}, {"t": T0 - timedelta(minutes=5), "k": k2}])
    engine.dispose()
    erp.frozen_at = T0 + timedelta(minutes=1)
    erp.upsert(customer(1, "ERP edit"), customer(2, "ERP edit"))
    result = cycle(path)
    assert result["conflicts_kept"] == 1
    state = target_state(postgres_url)
    assert state[k1][0] == "CRM edit" and state[k2][0] == "ERP edit"


def test_a_mapping_without_sync_settings_is_refused(tmp_path, erp, postgres_url):
    path = write_mapping(tmp_path, erp, postgres_url, "      watermark: ModifiedAt\n")
    path.write_text(path.read_text().replace("    sync:\n      watermark: ModifiedAt\n", ""))
    with pytest.raises(CrmbridgeError, match="no entity has a `sync:` block"):
        start_sync(path)


def test_sync_settings_are_checked_when_the_mapping_loads(tmp_path, erp, postgres_url):
    from crmbridge.errors import MappingError

    path = write_mapping(tmp_path, erp, postgres_url,
                         "      watermark: ModifiedAt\n      deletes: deactivate\n      conflicts: newest_wins\n"
                         "      modified_field: name\n")
    with pytest.raises(MappingError) as caught:
        load_mapping(path)
    text = str(caught.value)
    assert "`deletes: deactivate` needs `deleted_flag`" in text
    assert "missing `active_field`: `deletes: deactivate` needs a boolean field" in text
    assert "sync.modified_field: field `name` is string; expected a timestamp field" in text


def test_field_rule_keeps_the_fields_the_target_owns(tmp_path, erp, postgres_url):
    path = write_mapping(tmp_path, erp, postgres_url,
                         "      watermark: ModifiedAt\n      conflicts: fields\n      target_fields: [email, city]\n")
    cycle(path)
    k3 = external_id("erp", "customers", "K00003")
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:  # the CRM owns email and city once a customer exists there
        conn.execute(sa.text("UPDATE customers SET email = 'crm-owned@example.org' WHERE external_id = :k"),
                     {"k": k3})
    engine.dispose()
    erp.frozen_at = T0 + timedelta(seconds=10)
    erp.upsert({**customer(3, "ERP rename"), "Email": "erp-new@example.org", "City": "Porto"}, customer(900))
    result = cycle(path)
    state = target_state(postgres_url)
    assert state[k3][:3] == ("ERP rename", "crm-owned@example.org", "Berlin")  # name from the ERP only
    assert state[external_id("erp", "customers", "K00900")][1] == "c900@example.org"  # a new record: all fields
    assert result["created"] == 1 and result["conflicts_kept"] >= 1


def test_a_second_cycle_of_the_same_mapping_does_not_run_concurrently(tmp_path, erp, postgres_url):
    from crmbridge.flows.sync import cycle_lock

    path = write_mapping(tmp_path, erp, postgres_url, "      watermark: ModifiedAt\n")
    with cycle_lock(load_mapping(path)), pytest.raises(CrmbridgeError, match="another sync cycle of `erp-to-crm`"):
        start_sync(path)
    assert erp.calls == []  # it read nothing
    assert cycle(path)["created"] == 250  # and the lock is free again
