"""Retention (floor, signed archive, a chain that verifies across the cut) on SQLite and PostgreSQL, and the
reports: HTML checked in a real headless Chromium when one is installed, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from crmbridge.audit import report as reports
from crmbridge.audit.retention import RetentionError, purge, verify_archive
from crmbridge.audit.signing import Signer, public_pem
from crmbridge.audit.store import AuditStore
from crmbridge.audit.subjects import HmacReferencer
from crmbridge.audit.trail import AuditTrail
from crmbridge.audit.verify import verify_store

NOW = datetime(2030, 6, 1, tzinfo=UTC)


def _run(store: AuditStore, signer: Signer, run_id: str, when: datetime, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small run whose events carry the time `when`."""
    monkeypatch.setattr("crmbridge.audit.trail.utc_now", lambda: when.isoformat())
    trail = AuditTrail(store, run_id, "demo", "b" * 64, "alice", referencer=HmacReferencer(bytes(32)), signer=signer,
                       writer="inline",
                       run_details={"purpose": "migration", "lawful_basis": "contract", "details": {"entities": {
                           "contacts": {"fields": {"email": {"personal_data": "contact", "protect": "blind_index"}}}}}})
    trail.append("run_started", dry_run=False, entities=["contacts"])
    trail.records("record_created", "contacts", ["1", "2", "3"], target_ids=["t1", "t2", "t3"],
                  subjects=["a@x.org", "b@x.org", "c@x.org"])
    trail.records("record_quarantined", "contacts", ["4", "5"], reasons=["pattern_mismatch", "required_missing"])
    trail.append("run_finished", outcome="succeeded", totals={"contacts": {"created": 3, "quarantined": 2}})
    trail.checkpoint()
    trail.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'audit.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened = AuditStore(url)
    yield opened
    opened.close()


def test_purge_is_refused_inside_retention_and_under_the_floor(store: AuditStore, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    signer = Signer.from_file(tmp_path / "signing.key")
    _run(store, signer, "old", NOW - timedelta(days=4 * 365), monkeypatch)
    with pytest.raises(RetentionError, match="under the floor"):
        purge(store, signer, NOW - timedelta(days=3 * 365 + 30), tmp_path / "a.jsonl", retention_days=365, now=NOW)
    with pytest.raises(RetentionError, match="not yet past the 1095-day retention"):
        purge(store, signer, NOW - timedelta(days=100), tmp_path / "a.jsonl", retention_days=1095, now=NOW)
    with pytest.raises(RetentionError, match="not yet past"):
        purge(store, signer, NOW - timedelta(days=1000), tmp_path / "a.jsonl", retention_days=2000, now=NOW)
    assert not (tmp_path / "a.jsonl").exists() and store.count() == 7


def test_purge_archives_signed_and_the_chain_verifies_across_the_cut(store: AuditStore, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    signer = Signer.from_file(tmp_path / "signing.key")
    _run(store, signer, "old-1", NOW - timedelta(days=5 * 365), monkeypatch)
    _run(store, signer, "old-2", NOW - timedelta(days=4 * 365), monkeypatch)
    _run(store, signer, "recent", NOW - timedelta(days=30), monkeypatch)
    archive = tmp_path / "archive" / "audit-2026.jsonl"
    result = purge(store, signer, NOW - timedelta(days=3 * 365 + 1), archive, retention_days=1095, now=NOW)
    assert result.upto_seq == 14 and result.purged == 14 and store.count() == 7

    live = verify_store(store, signer.public)
    assert live.ok, live.findings
    assert live.first_seq == 15 and live.events == 7
    archived = verify_archive(archive, public_pem(signer.public))
    assert archived.ok, archived.findings
    assert archived.events == 14 and archived.checkpoints == 2

    # The archive is signed: a changed byte is caught.
    text = archive.read_text()
    archive.write_text(text.replace('"t2"', '"t9"', 1))
    assert not verify_archive(archive, public_pem(signer.public)).ok

    # Deleting live events past the anchor is still refused by the database itself.
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as conn:
        if store.dialect == "postgresql":
            conn.exec_driver_sql("SET LOCAL crmbridge.audit_purge = 'on'")
        conn.exec_driver_sql("DELETE FROM audit_events WHERE seq = 15")

    # A second purge continues from the first anchor; the second archive starts where the first ended.
    second = purge(store, signer, NOW + timedelta(days=1), tmp_path / "second.jsonl", retention_days=1095,
                   now=NOW + timedelta(days=1100))
    assert second.upto_seq == 21 and store.count() == 0
    assert verify_archive(tmp_path / "second.jsonl", public_pem(signer.public)).ok
    assert verify_store(store, signer.public).ok


def test_a_tampered_log_is_never_purged(store: AuditStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signer = Signer.from_file(tmp_path / "signing.key")
    _run(store, signer, "old", NOW - timedelta(days=4 * 365), monkeypatch)
    with store.engine.begin() as conn:
        if store.dialect == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER audit_events_no_update")
        else:
            conn.exec_driver_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
        conn.exec_driver_sql("UPDATE audit_events SET target_id = 'x' WHERE seq = 3")
    with pytest.raises(RetentionError, match="first bad event 3"):
        purge(store, signer, NOW - timedelta(days=3 * 365 + 1), tmp_path / "a.jsonl", retention_days=1095, now=NOW)


def _report_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[AuditStore, Signer]:
    store = AuditStore(f"sqlite:///{tmp_path / 'audit.db'}")
    signer = Signer.from_file(tmp_path / "signing.key")
    _run(store, signer, "run-a", NOW - timedelta(days=2), monkeypatch)
    _run(store, signer, "run-<b>", NOW - timedelta(days=1), monkeypatch)  # markup in a name is escaped
    return store, signer


def test_report_json_and_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, signer = _report_store(tmp_path, monkeypatch)
    data = reports.build(store, verify_store(store, signer.public))
    assert data["verification"]["ok"] and data["verification"]["events"] == 14
    assert [r["run_id"] for r in data["runs"]] == ["run-a", "run-<b>"]
    assert data["entities"] == {"contacts": {"created": 6, "quarantined": 4}}
    assert data["rejects"] == {"contacts": {"pattern_mismatch": 2, "required_missing": 2}}
    assert data["personal_data_fields"] == [{"entity": "contacts", "field": "email", "category": "contact",
                                             "protection": "blind_index"}]
    assert sum(data["key_usage"].values()) == 2
    one = reports.build(store, None, run="run-a")
    assert one["entities"] == {"contacts": {"created": 3, "quarantined": 2}} and len(one["runs"]) == 1
    period = reports.build(store, None, since=(NOW - timedelta(days=1, hours=1)).isoformat())
    assert [r["run_id"] for r in period["runs"]] == ["run-<b>"]
    rows = list(csv.DictReader(io.StringIO(reports.to_csv(data))))
    assert {"section": "rejects", "item": "contacts", "metric": "pattern_mismatch", "value": "2"} in rows
    assert json.loads(reports.to_json(data)) == json.loads(json.dumps(data))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_html_report_renders_in_a_headless_browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, signer = _report_store(tmp_path, monkeypatch)
    html = reports.to_html(reports.build(store, verify_store(store, signer.public)))
    assert "<script" not in html and "http" not in html.split("</head>")[0].replace("http-equiv", "")
    assert "run-&lt;b&gt;" in html and "run-<b>" not in html
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium installed (`apt-get install chromium`); the HTML was checked as text only")
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={tmp_path / 'chrome'}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    # What the browser built: the sections, the verification verdict, the runs and the escaped name.
    for section in ("verification", "runs", "entities", "rejects", "fields", "keys", "erasures"):
        assert f'id="{section}"' in dom
    assert "Verified: 14 events, 2 signed checkpoints" in dom
    assert dom.count("<tr>") >= 2 + 1 + 2 + 1 + 1
    assert "run-&lt;b&gt;" in dom and "<b>" not in dom
