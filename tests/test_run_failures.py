"""What a run does with bad input: it fails early with a clear message, or quarantines the row, and in
every case nothing is lost and the target is not left half-written."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crmbridge.cli.main import app
from crmbridge.errors import SchemaDriftError, SourceError, TargetError
from crmbridge.flows.migrate import start_run
from crmbridge.runs import list_runs

pytestmark = pytest.mark.prefect


def _count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _edit(mapping: Path, old: str, new: str) -> None:
    text = mapping.read_text(encoding="utf-8")
    assert old in text
    mapping.write_text(text.replace(old, new), encoding="utf-8")


def _last_manifest(project: Path):
    return list_runs(project / ".crmbridge")[-1].manifest()


def test_wrong_encoding_fails_before_anything_is_written(demo_project: Path) -> None:
    mapping = demo_project / "mapping.yaml"
    _edit(mapping, "encoding: gb18030", "encoding: utf-8")
    with pytest.raises(SourceError) as failure:
        start_run(mapping)
    message = str(failure.value)
    assert "partner_contacts.csv:1:1:" in message  # the header already holds Chinese column names
    assert "gb18030" in message.lower()
    target = demo_project / "data" / "target_crm.db"
    assert _count(target, "account") == 0 and _count(target, "contact") == 0
    manifest = _last_manifest(demo_project)
    assert manifest.status == "failed" and "cannot decode" in manifest.error


def test_unreachable_database_names_the_source_and_hides_the_password(demo_project: Path, monkeypatch) -> None:
    monkeypatch.setenv("LEGACY_DB_URL", "postgresql://legacy:S3cretPassw0rd@127.0.0.1:1/legacy")
    result = CliRunner().invoke(app, ["run", str(demo_project / "mapping.yaml")])
    assert result.exit_code == 1
    assert "cannot connect to source `legacy_crm`" in result.output
    assert "S3cretPassw0rd" not in result.output
    manifest = _last_manifest(demo_project)
    assert manifest.status == "failed" and "S3cretPassw0rd" not in manifest.error
    audit = b"".join(p.read_bytes() for p in (demo_project / ".crmbridge").glob("audit.db*"))  # the project's trail
    assert b"run_finished" in audit and b"S3cretPassw0rd" not in audit
    assert _count(demo_project / "data" / "target_crm.db", "account") == 0


def test_schema_drift_fails_before_extracting(demo_project: Path) -> None:
    with sqlite3.connect(demo_project / "data" / "legacy_crm.db") as conn:
        conn.execute("ALTER TABLE customers RENAME COLUMN phone TO phone_number")
    with pytest.raises(SchemaDriftError) as failure:
        start_run(demo_project / "mapping.yaml")
    message = str(failure.value)
    assert "entity `accounts`" in message and "column `phone` is missing" in message
    assert "phone_number" in message  # the columns actually found are listed
    assert _count(demo_project / "data" / "target_crm.db", "account") == 0


def test_retyped_column_is_schema_drift(demo_project: Path) -> None:
    _edit(demo_project / "mapping.yaml", "      company_name: string\n", "      company_name: integer\n")
    expected = r"column `company_name` is TEXT \(string\); the mapping expects integer"
    with pytest.raises(SchemaDriftError, match=expected):
        start_run(demo_project / "mapping.yaml")


def test_missing_target_column_fails_before_the_first_write(demo_project: Path) -> None:
    target = demo_project / "data" / "target_crm.db"
    with sqlite3.connect(target) as conn:
        conn.execute("ALTER TABLE contact DROP COLUMN city")
    with pytest.raises(TargetError, match=r"target table `contact` has no column.*`city`"):
        start_run(demo_project / "mapping.yaml")
    assert _count(target, "account") == 0  # accounts come first, but nothing was written


def test_rows_the_target_refuses_are_quarantined_and_the_rest_load(demo_project: Path) -> None:
    target = demo_project / "data" / "target_crm.db"
    with sqlite3.connect(target) as conn:  # the CRM refuses very long city names
        conn.executescript("""
            DROP TABLE contact;
            CREATE TABLE contact (
                id INTEGER PRIMARY KEY AUTOINCREMENT, external_id VARCHAR(64) NOT NULL UNIQUE,
                account_id INTEGER, first_name TEXT, last_name TEXT NOT NULL, email TEXT, phone TEXT,
                city TEXT CHECK (city IS NULL OR length(city) < 4), source_system TEXT NOT NULL);
        """)
    _, result = start_run(demo_project / "mapping.yaml")
    partners = {r["entity"]: r for r in result["entities"]}["partner_contacts"]
    assert partners["balanced"]
    with sqlite3.connect(demo_project / "data" / "target_crm.db") as conn:
        loaded = conn.execute("SELECT count(*) FROM contact WHERE source_system = 'partner_export'").fetchone()[0]
    assert loaded == partners["created"] > 0
    assert partners["quarantined"] > 1  # the broken line plus the refused long city names
    from crmbridge.staging import Staging

    staging = Staging(list_runs(demo_project / ".crmbridge")[-1].staging_path)
    try:
        refused = staging.quarantine_frame("partner_contacts").query("reason == 'target_rejected'")
    finally:
        staging.close()
    assert len(refused) > 0
    assert all("IntegrityError" in p for p in refused.problems)


def test_a_full_disk_is_reported_and_the_run_resumes_once_there_is_space(demo_project: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from crmbridge.errors import CrmbridgeError
    from crmbridge.flows.migrate import resume_run
    from crmbridge.staging import Staging

    real = Staging.stage_batch
    calls = {"n": 0}

    def fills_up(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the device fills up while the second batch is written
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Staging, "stage_batch", fills_up)
    with pytest.raises(CrmbridgeError) as failure:
        start_run(demo_project / "mapping.yaml")
    run = list_runs(demo_project / ".crmbridge")[-1]
    assert "no space left on the device holding" in str(failure.value)
    assert f"crmbridge resume {run.run_id}" in str(failure.value)
    assert run.manifest().status == "failed" and "no space left" in run.manifest().error

    monkeypatch.setattr(Staging, "stage_batch", real)
    result = resume_run(run)
    assert all(e["balanced"] for e in result["entities"])
    assert run.manifest().status == "succeeded" and len(run.manifest().resumed) == 1


def test_a_staging_store_deleted_during_the_run_is_reported(demo_project: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from crmbridge.errors import CrmbridgeError
    from crmbridge.flows import steps
    from crmbridge.flows.migrate import resume_run

    real = steps.after_staging

    def deletes_staging(ctx, entity):
        real(ctx, entity)
        ctx.run.staging_path.unlink(missing_ok=True)

    monkeypatch.setattr(steps, "after_staging", deletes_staging)
    with pytest.raises(CrmbridgeError, match="was deleted while the run was going"):
        start_run(demo_project / "mapping.yaml")
    run = list_runs(demo_project / ".crmbridge")[-1]
    assert run.manifest().status == "failed"
    with pytest.raises(CrmbridgeError, match="has no staging store"):
        resume_run(run)
