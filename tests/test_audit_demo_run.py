"""The audit trail of a real demo run: record-level lineage, no plaintext personal data anywhere in the store,
search by data subject, the CLI's verify (and its exit code after tampering), report and record of processing."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from crmbridge.cli.main import app
from crmbridge.flows.migrate import start_run

AUDIT = {"purpose": "CRM migration of existing customers", "lawful_basis": "contract",
         "data_subjects": ["customer contacts", "partner contacts"], "transfers": ["none"]}


def _audited_demo(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The demo mapping with audit settings, data categories, and the contacts' data subject (their e-mail,
    blind-indexed, so subject references come from the protection keyring)."""
    from crmbridge.protection.keyring import Keyring, MasterKeySealer

    path = project / "mapping.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.setdefault("settings", {})["audit"] = AUDIT
    data["protection"] = {"keyring": "keys/keyring.json", "master_key_env": "AUDIT_DEMO_MASTER_KEY"}
    for entity in data["entities"]:
        if entity["name"] in ("contacts", "partner_contacts"):
            for name, category in (("first_name", "identity"), ("last_name", "identity"), ("email", "contact"),
                                   ("phone", "contact")):
                if name in entity["fields"]:
                    entity["fields"][name]["personal_data"] = category
        if entity["name"] == "contacts":
            entity["subject"] = "email"
            entity["fields"]["email"]["protect"] = "blind_index"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    with sqlite3.connect(project / "data" / "target_crm.db") as conn:
        conn.execute("ALTER TABLE contact ADD COLUMN email_bidx TEXT")
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("AUDIT_DEMO_MASTER_KEY", key)
    Keyring.create(project / "keys" / "keyring.json", MasterKeySealer.from_text(key))
    return path


def _personal_values(project: Path) -> set[str]:
    """Names, e-mails and phone numbers of the demo's people, as the source and the target hold them."""
    values: set[str] = set()
    with sqlite3.connect(project / "data" / "legacy_crm.db") as db:
        for first, last, email, phone in db.execute("SELECT first_name, last_name, email, phone FROM contacts"):
            values |= {v.strip() for v in (first, last, email) if v and len(v.strip()) >= 4}
            if email and email.strip():
                values.add(email.strip().lower())
            digits = re.sub(r"\D", "", phone or "")
            if len(digits) >= 7:
                values.add(digits)
    with (project / "data" / "partner_contacts.csv").open(encoding="gb18030", errors="replace") as handle:
        for row in csv.DictReader(handle):
            for column in ("姓名", "邮箱"):
                value = (row.get(column) or "").strip()
                if len(value) >= 2:
                    values.add(value)
    return values


def test_demo_run_audit_has_lineage_and_no_plaintext_personal_data(demo_project: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    mapping = _audited_demo(demo_project, monkeypatch)
    # A loaded machine (two cores, parallel suites) can take longer than Prefect's default to start its server.
    with temporary_settings({PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        run, result = start_run(mapping)
    store_path = demo_project / ".crmbridge" / "audit.db"
    assert store_path.exists()

    # No plaintext personal data in any file of the store (the WAL and key files included).
    blobs = b"".join(p.read_bytes() for p in store_path.parent.glob("audit.db*"))
    assert blobs
    personal = _personal_values(demo_project)
    assert len(personal) > 300
    # A value that is also a word of the mapping or of the store's own schema (`fields`, `PRIMARY`) proves nothing.
    with sqlite3.connect(store_path) as db:
        neutral = mapping.read_text(encoding="utf-8") + " ".join(
            r[0] or "" for r in db.execute("SELECT sql FROM sqlite_master"))
    personal = {v for v in personal if v not in neutral}
    leaked = sorted(v for v in personal if v.encode() in blobs or v.encode("gb18030") in blobs)
    assert leaked == [], f"{len(leaked)} personal values in the audit store, e.g. {leaked[:1]}"

    db = sqlite3.connect(store_path)
    counts = dict(db.execute("SELECT action, count(*) FROM audit_events GROUP BY action").fetchall())
    totals = {e["entity"]: e for e in result["entities"]}
    assert counts["record_created"] == sum(t["created"] for t in totals.values())
    # Every quarantined row has its event with its reason code, except duplicate keys (counted per entity).
    import duckdb

    with duckdb.connect(str(run.staging_path), read_only=True) as staging:
        expected = dict(staging.execute("SELECT reason, count(*) FROM quarantine WHERE reason <> 'duplicate_key' "
                                        "GROUP BY reason").fetchall())
    reasons = dict(db.execute("SELECT reason, count(*) FROM audit_events WHERE action = 'record_quarantined' "
                              "GROUP BY reason").fetchall())
    assert reasons == expected and sum(expected.values()) > 0
    assert counts["run_started"] == 1 and counts["run_finished"] == 1
    assert db.execute("SELECT count(*) FROM audit_checkpoints").fetchone()[0] == 1
    db.close()

    runner = CliRunner()
    verified = runner.invoke(app, ["audit", "verify", str(mapping), "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.output)["ok"] is True

    # A data subject is found by their e-mail, written differently, and the record's lineage comes with it.
    with sqlite3.connect(demo_project / "data" / "target_crm.db") as target:
        target_id, email = target.execute(
            "SELECT id, email FROM contact WHERE email LIKE '%@%' ORDER BY id LIMIT 1").fetchone()
    found = runner.invoke(app, ["audit", "search", str(mapping), "--subject", f"  {email.upper()} ", "--json"])
    assert found.exit_code == 0, found.output
    payload = json.loads(found.output)
    created = [e for e in payload["events"] if e["action"] == "record_created"]
    assert created and {e["run_id"] for e in created} == {run.run_id}
    assert str(target_id) in {e["target_id"] for e in created}
    assert email not in found.output
    lineage = payload["lineage"][run.run_id]
    assert lineage["mapping_sha256"] == result.get("mapping_sha256", lineage["mapping_sha256"])
    entity = created[0]["entity"]
    assert lineage["entity"]["fields"]["email"]["transforms"] == ["trim", "lower"]
    assert lineage["entity"]["fields"]["email"]["personal_data"] == "contact"
    assert lineage["entity"]["subject_field"] == "email" and entity in ("contacts", "partner_contacts")

    by_record = runner.invoke(app, ["audit", "search", str(mapping), "--record", str(target_id), "--json"])
    assert {e["action"] for e in json.loads(by_record.output)["events"]} >= {"record_created"}

    ropa = json.loads(runner.invoke(app, ["audit", "ropa", str(mapping)]).output)
    assert ropa["purposes"] == [AUDIT["purpose"]] and ropa["lawful_basis"] == "contract"
    assert set(ropa["personal_data_categories"]) == {"identity", "contact"}
    assert ropa["recipients"] == ["crm (sql)"] and ropa["activity"]["runs"]["count"] == 1
    assert ropa["activity"]["records"]["contacts"]["created"] == totals["contacts"]["created"]

    report = demo_project / "report.json"
    made = runner.invoke(app, ["audit", "report", str(mapping), "--format", "json", "-o", str(report)])
    assert made.exit_code == 0, made.output
    data = json.loads(report.read_text())
    assert data["verification"]["ok"] and data["runs"][0]["outcome"] == "succeeded"
    assert data["runs"][0]["purpose"] == AUDIT["purpose"]
    assert {f["field"] for f in data["personal_data_fields"]} >= {"first_name", "last_name", "email", "phone"}
    assert {"entity": "contacts", "field": "email", "category": "contact", "protection": "blind_index"} in \
        data["personal_data_fields"]

    # Tampering with one event makes verify fail, name the position and exit 1.
    db = sqlite3.connect(store_path)
    db.execute("DROP TRIGGER audit_events_no_update")
    seq = db.execute("SELECT min(seq) FROM audit_events WHERE action = 'record_created'").fetchone()[0]
    db.execute("UPDATE audit_events SET target_id = 'someone-else' WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    broken = runner.invoke(app, ["audit", "verify", str(mapping)])
    assert broken.exit_code == 1
    assert f"first bad event at seq {seq}" in broken.output
