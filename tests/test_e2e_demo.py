"""The demo mapping through the real Prefect flow: target contents, ledger, quarantine, reconciliation,
idempotency and dry runs."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from crmbridge.flows.migrate import start_run
from crmbridge.staging import Staging

pytestmark = pytest.mark.prefect


def _rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def _by_entity(result: dict) -> dict[str, dict]:
    return {row["entity"]: row for row in result["entities"]}


def test_demo_migrates_and_reconciles(demo_project: Path) -> None:
    run, result = start_run(demo_project / "mapping.yaml")
    counts = _by_entity(result)
    target = demo_project / "data" / "target_crm.db"

    # Every source row is in exactly one bucket, for every entity.
    for entity in ("accounts", "contacts", "partner_contacts"):
        row = counts[entity]
        assert row["balanced"], row
        assert row["source"] == row["created"] + row["quarantined"]
        assert row["created"] > 0 and row["updated"] == row["unchanged"] == row["merged"] == 0
    assert counts["accounts"]["source"] == 120
    assert counts["contacts"]["source"] == 400
    assert counts["partner_contacts"]["source"] == 61  # 60 rows plus one broken line

    # The target holds exactly the created rows.
    assert _rows(target, "SELECT count(*) FROM account")[0][0] == counts["accounts"]["created"]
    contacts = counts["contacts"]["created"] + counts["partner_contacts"]["created"]
    assert _rows(target, "SELECT count(*) FROM contact")[0][0] == contacts

    # Cleansing reached the target: names collapsed and title-cased, phones digits only, country fixed.
    names = [n for (n,) in _rows(target, "SELECT name FROM account")]
    assert all(n == " ".join(n.split()) and n == n.title() for n in names)
    phones = [p for (p,) in _rows(target, "SELECT phone FROM account")]
    assert all(p.lstrip("+").isdigit() for p in phones)
    assert {c for (c,) in _rows(target, "SELECT DISTINCT country FROM account")} == {"US"}
    assert _rows(target, "SELECT count(*) FROM contact WHERE email <> lower(trim(email))")[0][0] == 0
    # Chinese names from the GB18030 export arrive intact.
    partner_names = [n for (n,) in _rows(target, "SELECT last_name FROM contact WHERE source_system = "
                                                 "'partner_export'")]
    assert partner_names and all("\u4e00" <= n[0] <= "\u9fff" for n in partner_names)
    # Naive Beijing timestamps were converted to UTC (8 hours earlier).
    legacy = _rows(demo_project / "data" / "legacy_crm.db", "SELECT cust_id, created_at FROM customers")
    staging = Staging(run.staging_path)
    try:
        ledger = staging.ledger_frame()
        quarantine = staging.quarantine_frame()
    finally:
        staging.close()
    accounts = ledger[ledger.entity == "accounts"]
    # A created row's ledger entry names no changed fields (every field is new) and keeps no before-image.
    assert set(accounts.action) == {"created"}
    assert accounts.changed.isna().all() and accounts.before_image.isna().all()
    first = accounts.iloc[0]
    created_at = _rows(target, f"SELECT created_at FROM account WHERE id = {int(first.target_key)}")[0][0]
    source_created = dict((str(k), v) for k, v in legacy)[first.source_key]
    assert created_at.startswith(_minus_8h(source_created))

    # References resolve to the parent's target key (account.id), through the ledger.
    account_ids = dict(zip(accounts.source_key, accounts.target_key, strict=True))
    legacy_links = dict(_rows(demo_project / "data" / "legacy_crm.db", "SELECT contact_id, cust_id FROM contacts"))
    contact_ledger = ledger[ledger.entity == "contacts"]
    for _, row in contact_ledger.head(50).iterrows():
        account_id = _rows(target, f"SELECT account_id FROM contact WHERE id = {int(row.target_key)}")[0][0]
        assert str(account_id) == account_ids[str(legacy_links[int(row.source_key)])]

    # The ledger has one entry per loaded row, with source key, external id and target key.
    assert len(ledger) == sum(counts[e]["created"] for e in counts)
    assert ledger.external_id.is_unique and ledger.target_key.notna().all()

    # Quarantine keeps every rejected row with reason codes and no values.
    reasons = set(quarantine.reason)
    assert {"required_missing", "unresolved_reference", "malformed_row"} <= reasons
    assert len(quarantine) == sum(counts[e]["quarantined"] for e in counts)
    for problems in quarantine.problems:
        for problem in json.loads(problems):
            assert "@" not in problem["detail"]  # no e-mail address (or any other value) in a reason

    # The reconciliation is also written as JSON in the run directory, and the manifest says succeeded.
    assert json.loads((run.path / "reconciliation.json").read_text())["entities"] == result["entities"]
    assert run.manifest().status == "succeeded"

    # Running the same mapping again changes nothing and creates no duplicate.
    _, again = start_run(demo_project / "mapping.yaml")
    for entity, row in _by_entity(again).items():
        assert row["unchanged"] == counts[entity]["created"], entity
        assert row["created"] == row["updated"] == 0
        assert row["quarantined"] == counts[entity]["quarantined"]
    assert _rows(target, "SELECT count(*) FROM contact")[0][0] == contacts


def _minus_8h(text: str) -> str:
    from datetime import datetime, timedelta

    return (datetime.fromisoformat(text) - timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S")


def test_changed_source_row_is_updated_with_before_image_and_dry_run_writes_nothing(demo_project: Path) -> None:
    mapping = demo_project / "mapping.yaml"
    start_run(mapping)
    legacy = demo_project / "data" / "legacy_crm.db"
    target = demo_project / "data" / "target_crm.db"
    with sqlite3.connect(legacy) as conn:
        cust_id, old_name = conn.execute(
            "SELECT cust_id, company_name FROM customers WHERE trim(company_name) <> '' ORDER BY cust_id LIMIT 1"
        ).fetchone()
        conn.execute("UPDATE customers SET company_name = 'Renamed Trading Co' WHERE cust_id = ?", (cust_id,))
    before = _rows(target, "SELECT * FROM account ORDER BY id")

    run, plan = start_run(mapping, dry_run=True)
    assert _by_entity(plan)["accounts"]["updated"] == 1
    assert _by_entity(plan)["contacts"]["updated"] == 0
    assert _rows(target, "SELECT * FROM account ORDER BY id") == before  # the dry run wrote nothing
    assert run.manifest().dry_run

    run, result = start_run(mapping)
    accounts = _by_entity(result)["accounts"]
    assert accounts["updated"] == 1 and accounts["balanced"]
    assert accounts["unchanged"] == _by_entity(plan)["accounts"]["unchanged"]
    staging = Staging(run.staging_path)
    try:
        updated = staging.ledger_frame("accounts").query("action == 'updated'").iloc[0]
    finally:
        staging.close()
    assert updated.source_key == str(cust_id)
    assert list(updated.changed) == ["name"]
    assert json.loads(updated.before_image) == {"name": " ".join(old_name.split()).title()}
    assert _rows(target, f"SELECT name FROM account WHERE id = {int(updated.target_key)}")[0][0] == \
        "Renamed Trading Co"
