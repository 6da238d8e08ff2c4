"""Rolling a run back: the demo loaded, the mapping changed, run again, and the second run rolled back until the
target equals its state after the first run, row for row, on SQLite, PostgreSQL and MariaDB; records edited in
the target after the run are reported and left alone (unless --force); a rollback killed midway resumes to the
same state; a second rollback does nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from typer.testing import CliRunner

from crmbridge.audit.project import open_store
from crmbridge.audit.store import COLUMNS
from crmbridge.cli.main import app
from crmbridge.flows.migrate import start_run
from crmbridge.flows.rollback import RollbackError, apply_rollback, plan_rollback
from crmbridge.mappings import load_mapping
from crmbridge.runs import RunDir
from crmbridge.staging import Staging

pytestmark = pytest.mark.prefect

TABLES = ("account", "contact")


def _create_demo_target(url: str) -> None:
    """The demo CRM's schema (examples/generate_demo.py builds it for SQLite), with a real foreign key."""
    metadata = sa.MetaData()
    sa.Table("account", metadata,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("external_id", sa.String(64), nullable=False, unique=True),
             sa.Column("name", sa.Text, nullable=False), sa.Column("phone", sa.Text), sa.Column("city", sa.Text),
             sa.Column("country", sa.Text), sa.Column("credit_limit", sa.Numeric(14, 2)),
             sa.Column("customer_since", sa.Date),
             sa.Column("created_at", sa.DateTime(timezone=True).with_variant(
                 mysql.DATETIME(fsp=6), "mysql", "mariadb")),
             mysql_charset="utf8mb4")
    sa.Table("contact", metadata,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("external_id", sa.String(64), nullable=False, unique=True),
             sa.Column("account_id", sa.Integer, sa.ForeignKey("account.id")),
             sa.Column("first_name", sa.Text), sa.Column("last_name", sa.Text, nullable=False),
             sa.Column("email", sa.Text), sa.Column("phone", sa.Text), sa.Column("city", sa.Text),
             sa.Column("source_system", sa.Text, nullable=False), mysql_charset="utf8mb4")
    engine = sa.create_engine(url)
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()


def _snapshot(url: str) -> dict[str, list[tuple]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {t: [tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {t} ORDER BY id"))] for t in TABLES}
    finally:
        engine.dispose()


def _execute(url: str, sql: str, **params) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql), params)
    finally:
        engine.dispose()


def _change_mapping(path: Path) -> None:
    """Account names upper case instead of title case (updates every account), a blank one named `Unnamed`
    (creates the accounts the first run quarantined, and with them contacts that pointed at them), and contacts
    without a required e-mail (creates more contacts)."""
    text = path.read_text(encoding="utf-8")
    changed = (text
               .replace("transform: [collapse_whitespace, title]\n        required: true\n      phone:",
                        "transform: [collapse_whitespace, upper, {default: Unnamed}]\n        required: true\n"
                        "      phone:", 1)
               .replace("        transform: [trim, lower]\n        required: true\n",
                        "        transform: [trim, lower]\n", 1))
    assert changed.count("{default: Unnamed}") == 1
    assert changed.count("required: true") == text.count("required: true") - 1
    path.write_text(changed, encoding="utf-8")


def _counts(report: dict) -> dict[str, dict]:
    return {row["entity"]: row for row in report["entities"]}


@pytest.fixture
def two_runs(demo_project: Path, any_db_url: str, monkeypatch: pytest.MonkeyPatch):
    """The demo loaded into the database (snapshot taken), then the changed mapping run over it."""
    if not any_db_url.startswith("sqlite"):
        _create_demo_target(any_db_url)
    else:
        any_db_url = f"sqlite:///{demo_project / 'data' / 'target_crm.db'}"
    monkeypatch.setenv("TARGET_DB_URL", any_db_url)
    mapping = demo_project / "mapping.yaml"
    start_run(mapping)
    first = _snapshot(any_db_url)
    _change_mapping(mapping)
    run, result = start_run(mapping)
    second = {row["entity"]: row for row in result["entities"]}
    assert second["accounts"]["updated"] > 50 and second["accounts"]["created"] > 0
    assert second["contacts"]["created"] > 0
    return run, any_db_url, first, second


def test_rollback_restores_the_first_runs_state_and_leaves_edited_records_alone(two_runs) -> None:
    run, url, first, second = two_runs
    written = {e: second[e]["created"] + second[e]["updated"] for e in second}
    staging = Staging(run.staging_path)
    try:
        ledger = staging.ledger_frame()
    finally:
        staging.close()
    updated = ledger[(ledger.entity == "accounts") & (ledger.action == "updated")].iloc[0]
    created = ledger[(ledger.entity == "contacts") & (ledger.action == "created")].iloc[0]
    # Edited in the target after the run: a field the run did not change, and a record the run created.
    _execute(url, "UPDATE account SET city = 'Edited After The Run' WHERE external_id = :e", e=updated.external_id)
    _execute(url, "UPDATE contact SET first_name = 'Edited' WHERE external_id = :e", e=created.external_id)

    plan = plan_rollback(run, batch_size=50).as_dict()
    counts = _counts(plan)
    assert counts["contacts"]["deleted"] == written["contacts"] - 1
    assert counts["accounts"]["restored"] == second["accounts"]["updated"] - 1
    assert counts["accounts"]["deleted"] == second["accounts"]["created"]
    assert all(row["balanced"] for row in plan["entities"]) and plan["dry_run"]
    conflicts = {(c["entity"], c["external_id"]): c for c in plan["conflicts"]}
    assert set(conflicts) == {("accounts", updated.external_id), ("contacts", created.external_id)}
    assert conflicts[("accounts", updated.external_id)]["fields"] == ["city"]
    assert conflicts[("contacts", created.external_id)]["fields"] == ["first_name"]
    assert conflicts[("accounts", updated.external_id)]["reason"] == "changed_after_run"
    edited = _snapshot(url)
    assert plan_rollback(run).as_dict()["entities"] == plan["entities"]  # planning changed nothing
    assert _snapshot(url) == edited

    # Small batches: many of them, children (contacts) before the accounts their foreign key points at.
    report = apply_rollback(run, batch_size=50).as_dict()
    counts = _counts(report)
    for entity, n in written.items():
        assert counts[entity]["written"] == n and counts[entity]["balanced"], counts[entity]
    assert counts["contacts"]["skipped"] == counts["accounts"]["skipped"] == 1
    after = _snapshot(url)
    edited_account = next(r for r in edited["account"] if r[1] == updated.external_id)
    edited_contact = next(r for r in edited["contact"] if r[1] == created.external_id)
    # Row for row the first run's state, except the two records edited after the run: left exactly as edited.
    assert [r for r in after["account"] if r[1] != updated.external_id] == \
        [r for r in first["account"] if r[1] != updated.external_id]
    assert [r for r in after["contact"] if r[1] != created.external_id] == first["contact"]
    assert edited_account in after["account"] and edited_contact in after["contact"]

    # A second rollback does nothing; it still lists what it leaves alone.
    again = apply_rollback(run).as_dict()
    assert not {k: v for k, v in again["this_attempt"].items() if k != "skipped"}
    assert _counts(again) == counts and _snapshot(url) == after

    # --force undoes them too: the created contact goes, the account gets the run's change (name) undone while
    # the city edited since (a field the run never changed) stays.
    forced = apply_rollback(run, force=True).as_dict()
    assert forced["this_attempt"] == {"deleted": 1, "restored": 1}
    assert _counts(forced)["contacts"]["deleted"] == written["contacts"]
    final = _snapshot(url)
    assert final["contact"] == first["contact"]
    first_account = next(r for r in first["account"] if r[1] == updated.external_id)
    assert next(r for r in final["account"] if r[1] == updated.external_id) == \
        tuple("Edited After The Run" if v == first_account[4] and i == 4 else v for i, v in enumerate(first_account))

    # The audit trail has the rollback's own events, with counts and no values.
    events = [e for e in _audit_events(run) if e["action"].startswith("rollback") or
              e["action"] == "record_rolled_back"]
    actions = [e["action"] for e in events]
    assert actions.count("rollback_started") == 3 and actions.count("rollback_finished") == 3
    assert actions.count("record_rolled_back") >= sum(written.values())
    assert "Edited" not in json.dumps(events)


def _audit_events(run: RunDir) -> list[dict]:
    store = open_store(load_mapping(run.manifest().mapping_path))
    try:
        rows = list(store.rows(f"run_id = {store.placeholder}", [run.run_id]))
    finally:
        store.close()
    return [dict(zip(COLUMNS, row, strict=True)) for row in rows]


KILLER = """
import os, signal, sys
from pathlib import Path
from crmbridge.flows import rollback
from crmbridge.runs import RunDir

calls = 0
record = rollback.Rollback._record

def record_then_die(self, entity, outcomes):
    global calls
    calls += 1
    if calls == int(sys.argv[2]):  # the target has committed this batch; the journal has only its intent
        os.kill(os.getpid(), signal.SIGKILL)
    record(self, entity, outcomes)

rollback.Rollback._record = record_then_die
rollback.apply_rollback(RunDir(Path(sys.argv[1])), batch_size=40)
"""


@pytest.mark.parametrize("any_db_url", ["sqlite", "postgres"], indirect=True)
def test_a_rollback_killed_midway_resumes_to_the_same_state(two_runs, tmp_path: Path) -> None:
    run, url, first, second = two_runs
    script = tmp_path / "killer.py"
    script.write_text(KILLER, encoding="utf-8")
    killed = subprocess.run([sys.executable, str(script), str(run.path), "3"], env={**os.environ},
                            capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    halfway = _snapshot(url)
    assert halfway != first  # stopped midway: some batches undone, not all
    assert not (run.path / "rollback.json").exists()

    resumed = apply_rollback(run, batch_size=40).as_dict()
    assert _snapshot(url) == first
    counts = _counts(resumed)
    for entity, row in second.items():
        assert counts[entity]["written"] == row["created"] + row["updated"]
        # The batch killed after the target committed counts as what it did, not as "already undone".
        assert counts[entity]["already_undone"] == 0 and counts[entity]["skipped"] == 0
        assert counts[entity]["deleted"] == row["created"] and counts[entity]["restored"] == row["updated"]
        assert counts[entity]["balanced"]
    assert json.loads((run.path / "rollback.json").read_text())["entities"] == resumed["entities"]
    assert apply_rollback(run).as_dict()["this_attempt"] == {}  # and then there is nothing left to do


def test_the_command_plans_applies_and_then_finds_nothing_to_do(demo_project: Path) -> None:
    mapping = demo_project / "mapping.yaml"
    start_run(mapping)
    _change_mapping(mapping)
    run, result = start_run(mapping)
    runner = CliRunner()
    where = ["--project", str(demo_project)]

    planned = runner.invoke(app, ["rollback", run.run_id[:15], "--dry-run", "--show", "2", *where])
    assert planned.exit_code == 0, planned.output
    assert "Rollback plan (dry run: nothing was changed)" in planned.output
    assert "would delete contacts:" in planned.output and "would restore accounts:" in planned.output
    as_json = json.loads(runner.invoke(app, ["rollback", run.run_id, "--dry-run", "--json", *where]).stdout)
    accounts = _counts(as_json)["accounts"]
    assert accounts["restored"] == _counts(result)["accounts"]["updated"]

    applied = runner.invoke(app, ["rollback", run.run_id, *where])  # the Prefect flow `crmbridge-rollback`
    assert applied.exit_code == 0, applied.output
    written = sum(r["created"] + r["updated"] for r in result["entities"])
    assert f"{written} records undone now" in applied.output
    again = runner.invoke(app, ["rollback", run.run_id, *where])
    assert again.exit_code == 0 and "nothing left to roll back" in again.output


class _PlainTarget:
    """A target that can write but not roll back."""

    def prepare(self, entity, dry_run):
        pass

    def fetch_existing(self, entity, external_ids):
        return {}

    def write(self, entity, rows):
        return []

    def target_keys(self, entity, external_ids):
        return {}

    def close(self):
        pass


def test_what_cannot_be_rolled_back_is_refused_with_the_reason(demo_project: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    mapping = demo_project / "mapping.yaml"
    run, _ = start_run(mapping)
    planned, _ = start_run(mapping, dry_run=True)
    with pytest.raises(RollbackError, match="was a dry run: it wrote nothing"):
        plan_rollback(planned)

    class Plain:
        kind = "plaincrm"

        def open_target(self):
            return _PlainTarget()

    monkeypatch.setattr("crmbridge.flows.rollback.connector_for", lambda connection, mapping: Plain())
    with pytest.raises(RollbackError, match=r"target `crm` \(plaincrm\) cannot roll back"):
        apply_rollback(run)
    monkeypatch.undo()

    manifest = run.manifest()  # a run that stopped: its plan says to resume it first
    manifest.status = "failed"
    run.write_manifest(manifest)
    assert "run `crmbridge resume" in " ".join(plan_rollback(run).warnings)

    _change_mapping(mapping)
    with pytest.raises(RollbackError, match=r"changed since run .* restore that file"):
        apply_rollback(run)


def test_protected_fields_stay_encrypted_in_before_images_and_still_roll_back(demo_project: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    import yaml

    from crmbridge.protection.keyring import Keyring, MasterKeySealer

    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("ROLLBACK_MASTER_KEY", key)
    Keyring.create(demo_project / "keys" / "keyring.json", MasterKeySealer.from_text(key))
    path = demo_project / "mapping.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["protection"] = {"keyring": "keys/keyring.json", "master_key_env": "ROLLBACK_MASTER_KEY"}
    entities = {e["name"]: e for e in data["entities"]}
    entities["accounts"]["fields"]["name"]["protect"] = "deterministic"
    entities["accounts"]["fields"]["phone"]["protect"] = "encrypt"
    entities["contacts"]["fields"]["first_name"]["protect"] = "encrypt"
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    url = f"sqlite:///{demo_project / 'data' / 'target_crm.db'}"
    start_run(path)
    first = _snapshot(url)

    entities["accounts"]["fields"]["name"]["transform"] = ["collapse_whitespace", "upper", {"default": "Unnamed"}]
    entities["contacts"]["fields"]["email"].pop("required")
    path.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    run, result = start_run(path)
    assert _counts(result)["accounts"]["updated"] > 50

    staging = Staging(run.staging_path)
    try:
        images = staging.con.execute("SELECT before_image::VARCHAR FROM ledger WHERE entity = 'accounts' "
                                     "AND action = 'updated'").fetchall()
    finally:
        staging.close()
    old_names = {row[2] for row in first["account"]}
    sealed = [json.loads(image)["name"] for (image,) in images]
    assert sealed and not old_names & set(sealed)  # the title-case names the target held are not in the clear
    assert not any(name in text for text in sealed for name in old_names if len(name) > 5)

    report = apply_rollback(run).as_dict()
    assert all(row["balanced"] and row["skipped"] == 0 for row in report["entities"]), report["entities"]
    assert _snapshot(url) == first
