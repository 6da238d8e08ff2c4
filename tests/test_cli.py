"""The `crmbridge` command as a user runs it: init, schema, validate, preview, run, runs, report, quarantine."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crmbridge.cli.main import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_schema_prints_the_published_schema() -> None:
    result = invoke("schema")
    assert result.exit_code == 0
    printed = json.loads(result.stdout)
    on_disk = json.loads((Path(__file__).parents[1] / "schemas" / "mapping.schema.json").read_text())
    assert printed == on_disk


def test_init_scaffolds_a_project_that_validates(tmp_path: Path) -> None:
    project = tmp_path / "myproject"
    result = invoke("init", str(project))
    assert result.exit_code == 0, result.stdout
    mapping = (project / "mapping.yaml").read_text()
    assert mapping.startswith("# yaml-language-server: $schema=./mapping.schema.json")
    assert json.loads((project / "mapping.schema.json").read_text())["title"] == "crmbridge mapping"
    assert "CRM_DB_URL" in (project / ".env.example").read_text()
    assert ".env" in (project / ".gitignore").read_text().splitlines()
    result = invoke("validate", str(project / "mapping.yaml"))
    assert result.exit_code == 0, result.stdout
    assert "ok" in result.stdout
    # A second init into the same, now non-empty, directory refuses.
    assert invoke("init", str(project)).exit_code == 2


def test_validate_reports_every_problem_with_position(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nname: bad\nsources:\n  s: {type: csv, path: x.csv}\ntargets:\n  t: {type: sql, url: 'sqlite://'}\n"
        "entities:\n  - name: a\n    source: s\n    key: id\n    target: t\n    target_table: a\n    fields:\n"
        "      Email:\n        from: email\n        transform: [trim, lower, shout]\n"
        "  - name: b\n    source: nowhere\n    key: id\n    target: t\n    target_table: b\n"
        "    fields:\n      x: {from: y}\n"
    )
    result = runner.invoke(app, ["validate", str(bad), "--offline"])
    assert result.exit_code == 2
    output = result.output
    assert "2 problems" in output
    assert f"{bad}:16:" in output and "entities[0].fields.Email.transform[2]" in output
    assert "unknown transform `shout`" in output
    assert "entities[1].source" in output and "unknown source `nowhere`" in output


def test_validate_checks_the_real_source(demo_project: Path) -> None:
    import sqlite3

    with sqlite3.connect(demo_project / "data" / "legacy_crm.db") as conn:
        conn.execute("ALTER TABLE contacts DROP COLUMN email")
    result = runner.invoke(app, ["validate", str(demo_project / "mapping.yaml")])
    assert result.exit_code == 1
    assert "column `email` is missing" in result.output
    assert invoke("validate", "--offline", str(demo_project / "mapping.yaml")).exit_code == 0


def test_preview_shows_before_and_after_with_masks(demo_project: Path) -> None:
    result = invoke("preview", str(demo_project / "mapping.yaml"), "--limit", "5", "--entity", "contacts")
    assert result.exit_code == 0, result.output
    assert "before (source)" in result.output and "after (cleansed)" in result.output
    assert "•••" in result.output  # e-mails and phones are masked
    assert "@gmail.com" not in result.output.replace("•••@gmail.com", "")
    unknown = runner.invoke(app, ["preview", str(demo_project / "mapping.yaml"), "--entity", "nope"])
    assert unknown.exit_code == 2 and "no entity `nope`" in unknown.output


@pytest.mark.prefect
def test_run_runs_report_and_quarantine_export(demo_project: Path) -> None:
    mapping = str(demo_project / "mapping.yaml")
    result = invoke("run", mapping, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would create" in result.output and "dry run" in result.output
    result = invoke("run", mapping)
    assert result.exit_code == 0, result.output
    assert "Reconciliation" in result.output and "NO" not in result.output

    listing = invoke("runs", "--project", str(demo_project))
    assert listing.exit_code == 0
    assert listing.output.count("succeeded") == 2
    run_ids = sorted(p.name for p in (demo_project / ".crmbridge" / "runs").iterdir())
    report = invoke("report", run_ids[-1], "--project", str(demo_project), "--json")
    data = json.loads(report.stdout)
    assert data["manifest"]["status"] == "succeeded"
    assert all(e["balanced"] for e in data["reconciliation"]["entities"])

    out = demo_project / "quarantine.csv"
    exported = invoke("quarantine", "export", run_ids[-1], "--project", str(demo_project), "-o", str(out))
    assert exported.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == sum(e["quarantined"] for e in data["reconciliation"]["entities"])
    assert {"_entity", "_row", "_key", "_stage", "_rule", "_field", "_message", "_value", "_problems"} <= set(rows[0])
    assert not any("@" in r["_problems"] for r in rows)

    missing = runner.invoke(app, ["report", "nope", "--project", str(demo_project)])
    assert missing.exit_code == 1 and "no run `nope`" in missing.output


def test_quarantine_export_masks_keys_like_their_fields(tmp_path: Path) -> None:
    project = tmp_path / "p"
    assert invoke("init", str(project)).exit_code == 0
    mapping = project / "mapping.yaml"
    # Key the customers by e-mail: the exported key must then be masked like the e-mail field.
    text = mapping.read_text().replace("key: customer_no", "key: email")
    mapping.write_text(text)
    (project / "data" / "customers.csv").write_text(
        "customer_no,name,email,phone,since\n1,,ada@example.com,555,2001-01-01\n")
    assert invoke("run", str(mapping)).exit_code == 0
    run_id = next((project / ".crmbridge" / "runs").iterdir()).name
    exported = invoke("quarantine", "export", run_id, "--project", str(project))
    assert "ada@example.com" not in exported.stdout
    assert "a•••@example.com" in exported.stdout
    # Without a readable mapping every key is fully masked.
    mapping.unlink()
    exported = invoke("quarantine", "export", run_id, "--project", str(project))
    assert "example.com" not in exported.stdout and "•••" in exported.stdout
