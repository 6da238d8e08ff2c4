"""`crmbridge audit ...` as an auditor uses it: export the log and a checkpoint, verify both with only the
public key, prove one event's inclusion; refusals and failures exit non-zero."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crmbridge.audit.project import open_trail
from crmbridge.cli.main import app
from crmbridge.mappings import load_mapping

MAPPING = """\
version: 1
name: audit-cli
settings:
  audit:
    purpose: testing the audit commands
    lawful_basis: legitimate_interests
sources:
  legacy:
    type: csv
    path: people.csv
targets:
  crm:
    type: sql
    url: sqlite:///crm.db
entities:
  - name: people
    source: legacy
    key: id
    target: crm
    target_table: person
    create_table: true
    fields:
      email:
        from: email
        personal_data: contact
"""

runner = CliRunner()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "people.csv").write_text("id,email\n1,a@example.org\n", encoding="utf-8")
    (tmp_path / "mapping.yaml").write_text(MAPPING, encoding="utf-8")
    mapping = load_mapping(tmp_path / "mapping.yaml")
    for run_id in ("run-1", "run-2"):
        trail = open_trail(mapping, run_id, "tester")
        trail.append("run_started", dry_run=False, entities=["people"])
        trail.records("record_created", "people", [str(i) for i in range(30)],
                      target_ids=[f"p-{i}" for i in range(30)], subjects=[f"user{i}@example.org" for i in range(30)])
        trail.append("run_finished", outcome="succeeded")
        trail.checkpoint()
        trail.close()
    return tmp_path


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_an_auditor_verifies_an_export_a_checkpoint_and_an_inclusion_proof(project: Path) -> None:
    mapping = str(project / "mapping.yaml")
    _ok(["audit", "public-key", mapping, "-o", str(project / "pub.pem")])
    _ok(["audit", "export", mapping, "-o", str(project / "log.jsonl")])
    _ok(["audit", "checkpoint", "export", mapping, "--run", "run-2", "-o", str(project / "cp.json")])
    seq = next(e["seq"] for e in json.loads(_ok(["audit", "search", mapping, "--subject", "USER7@example.org ",
                                                  "--run", "run-2", "--json"]))["events"])
    _ok(["audit", "prove", mapping, "--seq", str(seq), "-o", str(project / "proof.json")])

    pub = str(project / "pub.pem")
    assert "verified" in _ok(["audit", "verify", "--file", str(project / "log.jsonl"), "--public-key", pub])
    out = _ok(["audit", "checkpoint", "verify", str(project / "cp.json"), "--public-key", pub,
               "--log", str(project / "log.jsonl"), "--proof", str(project / "proof.json")])
    assert "signature valid" in out and "the event is included" in out

    # The exported log, altered: verify names the event and exits 1.
    lines = (project / "log.jsonl").read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if f'"seq": {seq},' in line)
    lines[index] = lines[index].replace('"p-7"', '"p-70"')
    (project / "bad.jsonl").write_text("\n".join(lines) + "\n")
    bad = runner.invoke(app, ["audit", "verify", "--file", str(project / "bad.jsonl"), "--public-key", pub])
    assert bad.exit_code == 1 and f"first bad event at seq {seq}" in bad.output

    # Another key does not verify the checkpoint.
    other = project / "other"
    other.mkdir()
    (other / "people.csv").write_text("id,email\n", encoding="utf-8")
    (other / "mapping.yaml").write_text(MAPPING, encoding="utf-8")
    open_trail(load_mapping(other / "mapping.yaml"), "x", "t").checkpoint()
    _ok(["audit", "public-key", str(other / "mapping.yaml"), "-o", str(other / "pub.pem")])
    wrong = runner.invoke(app, ["audit", "checkpoint", "verify", str(project / "cp.json"), "--public-key",
                                str(other / "pub.pem")])
    assert wrong.exit_code == 1 and "does not verify" in wrong.output

    # The audit commands are themselves in the trail, and the trail still verifies after them.
    assert "verified" in _ok(["audit", "verify", mapping])
    actions = [e["action"] for e in json.loads(_ok(["audit", "search", mapping, "--json"]))["events"]]
    assert actions[-2:] == ["export", "audit_verified"]


def test_purge_inside_retention_is_refused_and_report_formats(project: Path) -> None:
    mapping = str(project / "mapping.yaml")
    refused = runner.invoke(app, ["audit", "purge", mapping, "--before", "2026-01-01",
                                  "--archive", str(project / "a.jsonl")])
    assert refused.exit_code == 1 and "purge refused" in refused.output
    assert not (project / "a.jsonl").exists()
    for fmt in ("html", "csv", "json"):
        _ok(["audit", "report", mapping, "--format", fmt, "-o", str(project / f"r.{fmt}")])
    assert json.loads((project / "r.json").read_text())["entities"] == {"people": {"created": 60}}
    assert "Verified: " in (project / "r.html").read_text()
    ropa = runner.invoke(app, ["audit", "ropa", mapping, "--format", "csv"])
    assert "personal_data:contact,people.email" in ropa.output
    assert "user7@example.org" not in (project / ".crmbridge" / "audit.db").read_bytes().decode("latin-1")
