"""The consultant's loop: export a run's quarantine as CSV, fix values, retry; the run's reconciliation moves
the fixed rows from quarantined to loaded, rows that still fail stay quarantined with their new reasons."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest
from cleanse_project import write_project
from typer.testing import CliRunner

from crmbridge.cli.main import app
from crmbridge.flows.migrate import start_run

pytestmark = pytest.mark.prefect
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def _export(project: Path, run_id: str) -> list[dict[str, str]]:
    result = invoke("quarantine", "export", run_id, "--project", str(project))
    assert result.exit_code == 0, result.output
    return list(csv.DictReader(io.StringIO(result.stdout)))


def _write(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_export_fix_retry_moves_rows_from_quarantined_to_loaded(tmp_path: Path) -> None:
    mapping = write_project(tmp_path)
    run, first = start_run(mapping)
    rows = _export(tmp_path, run.run_id)
    by_key = {(r["_entity"], r["_key"]): r for r in rows}
    assert len(rows) == 8
    phone = by_key[("accounts", "A3")]
    # The rule, field, message and value are kept; masked fields stay masked, the rest is as the source has it.
    assert (phone["_rule"], phone["_field"], phone["_message"], phone["_value"]) == \
        ("invalid_phone", "phone", "expected a valid phone number", "•••2345")
    assert (phone["name"], phone["country"], phone["phone"]) == ("ＢＥＩＪＩＮＧ　Ｔｅｃｈ", "CN", "•••2345")
    assert by_key[("contacts", "C3")]["email"] == "•••"  # mask: email, and no @ to keep
    assert by_key[("contacts", "C7")]["id_number"] == "•••"  # mask: full

    # The consultant fixes five rows, leaves masked cells alone, and cannot fix two.
    by_key[("accounts", "A3")]["phone"] = "13800138001"
    by_key[("accounts", "A4")]["country"] = "Germany"   # its masked phone stays: the source's value is used
    by_key[("accounts", "A5")]["tier"] = "gold"
    by_key[("contacts", "C3")]["email"] = "wang.wei@example.com"
    by_key[("contacts", "C4")]["birthday"] = "30/04/1990"
    by_key[("contacts", "C6")]["email"] = "ronald@example.com"  # still not unique
    fixed = tmp_path / "fixed.csv"
    _write(fixed, rows)

    result = invoke("quarantine", "retry", run.run_id, str(fixed), "--project", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "accounts: 3 rows retried, 3 loaded, 0 still quarantined" in result.output
    assert "contacts: 5 rows retried, 2 loaded, 3 still quarantined" in result.output

    after = json.loads((run.path / "reconciliation.json").read_text(encoding="utf-8"))
    totals = {e["entity"]: (e["source"], e["created"], e["quarantined"], e["balanced"]) for e in after["entities"]}
    before = {e["entity"]: (e["source"], e["created"], e["quarantined"]) for e in first["entities"]}
    assert before == {"accounts": (6, 3, 3), "contacts": (7, 2, 5)}
    assert totals == {"accounts": (6, 6, 0, True), "contacts": (7, 4, 3, True)}
    remaining = {(r["_entity"], r["_key"]): r["_rule"] for r in _export(tmp_path, run.run_id)}
    assert remaining == {("contacts", "C5"): "reference_missing", ("contacts", "C6"): "not_unique",
                         ("contacts", "C7"): "invalid_id"}

    with sqlite3.connect(tmp_path / "data" / "crm.db") as conn:
        accounts = dict(conn.execute("SELECT name, phone FROM account").fetchall())
        contacts = {r[0] for r in conn.execute("SELECT email FROM contact").fetchall()}
    assert accounts["Beijing Tech"] == "+8613800138001"
    assert accounts["Globex"] == "+16502530000"  # the masked phone kept the source's value
    assert contacts == {"ouyang.xiu@example.com", "ronald@example.com", "wang.wei@example.com", "anna@example.com"}
    history = json.loads((run.path / "retries.json").read_text(encoding="utf-8"))
    assert history[0]["entities"]["accounts"] == {"retried": 3, "loaded": 3, "quarantined": 0}

    # A loaded row cannot be retried again; a changed mapping is refused unless accepted.
    again = invoke("quarantine", "retry", run.run_id, str(fixed), "--project", str(tmp_path))
    assert again.exit_code == 1 and "is not in the quarantine" in again.output
    mapping.write_text(mapping.read_text(encoding="utf-8") + "\n# edited\n", encoding="utf-8")
    _write(fixed, [r for r in rows if r["_key"] == "C7"])
    changed = invoke("quarantine", "retry", run.run_id, str(fixed), "--project", str(tmp_path))
    assert changed.exit_code == 1 and "changed since run" in changed.output
    accepted = invoke("quarantine", "retry", run.run_id, str(fixed), "--project", str(tmp_path),
                      "--accept-changed-mapping")
    assert accepted.exit_code == 0 and "contacts: 1 rows retried, 0 loaded, 1 still quarantined" in accepted.output


def test_a_fixed_file_that_is_not_an_export_is_refused(tmp_path: Path) -> None:
    mapping = write_project(tmp_path)
    run, _ = start_run(mapping)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("name,phone\nx,1\n", encoding="utf-8")
    result = invoke("quarantine", "retry", run.run_id, str(wrong), "--project", str(tmp_path))
    assert result.exit_code == 1 and "missing: _entity, _row" in result.output
    wrong.write_text("_entity,_row\nnope,4\n", encoding="utf-8")
    result = invoke("quarantine", "retry", run.run_id, str(wrong), "--project", str(tmp_path))
    assert result.exit_code == 1 and "unknown entity `nope`" in result.output
    wrong.write_text("_entity,_row\naccounts,four\n", encoding="utf-8")
    result = invoke("quarantine", "retry", run.run_id, str(wrong), "--project", str(tmp_path))
    assert result.exit_code == 1 and "wrong.csv:2: column `_row`" in result.output
