"""The demo with protected fields, end to end.

- the leak test: a whole run through the CLI (own Prefect home), then every file it wrote is scanned for
  the plaintext of the protected fields, byte for byte and, for the DuckDB staging (whose string compression
  would hide a value from a byte scan), value by value;
- a plaintext target receives exactly the cleansed values while staging holds only envelopes;
- dedup over the staged blind index finds the duplicates plaintext finds;
- `crmbridge erase --subject` makes a person's staged values undecryptable and is audited by reference.
"""

from __future__ import annotations

import base64
import csv
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

from crmbridge.mappings import load_mapping
from crmbridge.protection import ErasedSubjectError, protector_for
from crmbridge.protection.blind_index import normalise

pytestmark = pytest.mark.prefect

POLICIES = {
    "accounts": {"phone": "encrypt", "name": "deterministic"},
    "contacts": {"first_name": "encrypt", "last_name": "encrypt", "email": "blind_index", "phone": "encrypt"},
    "partner_contacts": {"last_name": "encrypt", "email": "blind_index", "phone": "hash"},
}
CLI = [sys.executable, "-m", "crmbridge.cli.main"]


def protect_demo(project: Path, receives: str) -> Path:
    """The demo mapping with protected fields, a keyring location, and a target schema with room for tokens."""
    mapping = yaml.safe_load((project / "mapping.yaml").read_text(encoding="utf-8"))
    mapping["protection"] = {"keyring": "keys/keyring.json", "master_key_env": "DEMO_MASTER_KEY"}
    mapping["targets"]["crm"]["receives"] = receives
    for entity in mapping["entities"]:
        for name, policy in POLICIES[entity["name"]].items():
            entity["fields"][name]["protect"] = policy
        if entity["name"] == "contacts":
            entity["subject"] = "email"
    (project / "mapping.yaml").write_text(yaml.safe_dump(mapping, allow_unicode=True, sort_keys=False),
                                          encoding="utf-8")
    with sqlite3.connect(project / "data" / "target_crm.db") as conn:
        conn.execute("ALTER TABLE contact ADD COLUMN email_bidx TEXT")
    return project / "mapping.yaml"


def plaintexts(project: Path) -> set[str]:
    """The protected fields' values as the source has them and as cleansing leaves them.

    A value that also occurs inside an unprotected value (a first name `Joseph` in the city `Port Joseph`)
    is left out: finding it would prove nothing. So are forms under 6 bytes, which random bytes can match,
    and all-lowercase single words (a messy `fields` is also a column of Prefect's own database); their
    cleansed, title-cased forms are still looked for."""
    protected: list[str] = []
    unprotected: list[str] = []
    with sqlite3.connect(project / "data" / "legacy_crm.db") as conn:
        for company, phone, *rest in conn.execute("SELECT company_name, phone, city, country, credit_limit, "
                                                  "customer_since, created_at FROM customers"):
            protected += [company, phone]
            unprotected += rest
        for row in conn.execute("SELECT first_name, last_name, email, phone FROM contacts"):
            protected += row
    with open(project / "data" / "partner_contacts.csv", encoding="gb18030", newline="") as handle:
        for record in csv.DictReader(handle):
            protected += [record.get("姓名"), record.get("邮箱"), record.get("手机")]
            unprotected += [v for k, v in record.items() if k not in ("姓名", "邮箱", "手机")]
    corpus = "\n".join(" ".join(str(v).split()) for v in unprotected if v is not None).casefold()
    found: set[str] = set()
    for value in protected:
        if not value or not value.strip():
            continue
        collapsed = " ".join(value.split())
        forms = {value.strip(), collapsed, collapsed.title(), "".join(ch for ch in value if ch.isdigit())}
        if "@" in value:
            forms.add(collapsed.lower())
        found |= {f for f in forms if len(f.encode()) >= 6 and f.casefold() not in corpus
                  and not (f.isascii() and f.isalpha() and f.islower())}
    return found


def scan_bytes(roots: list[Path], secrets: set[str]) -> dict[str, list[str]]:
    needles = [(s, s.encode()) for s in secrets]
    leaks: dict[str, list[str]] = {}
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                hits = [s for s, needle in needles if needle in data]
                if hits:
                    leaks[str(path)] = hits[:5]
    return leaks


def scan_duckdb(path: Path, secrets: set[str]) -> list[str]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        hits = []
        for (table,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall():
            columns = [c for (c,) in con.execute("SELECT column_name FROM information_schema.columns "
                                                 "WHERE table_name = ?", [table]).fetchall()]
            for row in con.execute(f'SELECT * FROM "{table}"').fetchall():
                for column, value in zip(columns, row, strict=True):
                    text = "" if value is None else str(value)
                    hits += [f"{table}.{column}" for s in secrets if s in text]
        return hits
    finally:
        con.close()


def test_nothing_a_protected_run_writes_holds_plaintext(demo_project: Path, tmp_path: Path) -> None:
    mapping = protect_demo(demo_project, "ciphertext")
    secrets = plaintexts(demo_project)
    assert len(secrets) > 500
    homes = {"PREFECT_HOME": tmp_path / "prefect", "CRMBRIDGE_HOME": tmp_path / "crmbridge-home"}
    env = {**os.environ, **{k: str(v) for k, v in homes.items()},
           "DEMO_MASTER_KEY": base64.b64encode(os.urandom(32)).decode(), "COLUMNS": "200",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}  # a busy machine starts it slowly
    outputs = tmp_path / "outputs"
    outputs.mkdir()

    def cli(*args: str) -> str:
        done = subprocess.run([*CLI, *args], cwd=demo_project, env=env, capture_output=True, text=True, timeout=240)
        (outputs / f"{args[0]}-{len(list(outputs.iterdir()))}.txt").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    cli("keys", "init", str(mapping))
    cli("run", str(mapping))
    run_id = next((demo_project / ".crmbridge" / "runs").iterdir()).name
    cli("quarantine", "export", run_id, "-o", str(outputs / "quarantine.csv"))
    cli("report", run_id, "--json")
    cli("preview", str(mapping), "--limit", "50")
    cli("keys", "list", str(mapping))
    assert (outputs / "quarantine.csv").stat().st_size > 100

    written = [demo_project / ".crmbridge", demo_project / "keys", demo_project / "data" / "target_crm.db",
               outputs, *homes.values()]
    assert not scan_bytes(written, secrets), "plaintext of protected fields in files the run wrote"
    staging = next((demo_project / ".crmbridge" / "runs").iterdir()) / "staging.duckdb"
    assert not scan_duckdb(staging, secrets)
    # the scan can find what it looks for: the source files hold the same values
    assert scan_bytes([demo_project / "data" / "legacy_crm.db"], secrets)
    # the target got ciphertext, and tokens truncated to 16 bytes
    with sqlite3.connect(demo_project / "data" / "target_crm.db") as conn:
        pairs = conn.execute("SELECT email, email_bidx FROM contact WHERE email IS NOT NULL").fetchall()
    emails, tokens = zip(*pairs, strict=True)
    assert all(len(t) == 32 for t in tokens) and not any("@" in e for e in emails)


@pytest.fixture
def plaintext_demo(demo_project: Path, monkeypatch: pytest.MonkeyPatch):
    from crmbridge.protection.keyring import Keyring, MasterKeySealer

    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("DEMO_MASTER_KEY", key)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy machine is slow
    path = protect_demo(demo_project, "plaintext")
    Keyring.create(demo_project / "keys" / "keyring.json", MasterKeySealer.from_text(key))
    return path


def test_plaintext_target_dedup_and_erasure(plaintext_demo: Path, tmp_path: Path) -> None:
    from crmbridge.flows.migrate import start_run

    # The same demo without protection, for the values a target should receive.
    plain_copy = tmp_path / "plain"
    plain_copy.mkdir()
    (plain_copy / "data").mkdir()
    unprotected = yaml.safe_load(plaintext_demo.read_text(encoding="utf-8"))
    del unprotected["protection"], unprotected["targets"]["crm"]["receives"]
    for entity in unprotected["entities"]:
        entity.pop("subject", None)
        for spec in entity["fields"].values():
            spec.pop("protect", None)
    (plain_copy / "mapping.yaml").write_text(yaml.safe_dump(unprotected, allow_unicode=True), encoding="utf-8")
    for name in ("legacy_crm.db", "partner_contacts.csv", "target_crm.db"):
        (plain_copy / "data" / name).write_bytes((plaintext_demo.parent / "data" / name).read_bytes())

    run, result = start_run(plaintext_demo)
    start_run(plain_copy / "mapping.yaml")
    query = "SELECT external_id, first_name, last_name, email, phone, source_system FROM contact ORDER BY 1"
    with sqlite3.connect(plaintext_demo.parent / "data" / "target_crm.db") as conn:
        protected_rows = conn.execute(query).fetchall()
        accounts = conn.execute("SELECT external_id, name, phone FROM account ORDER BY 1").fetchall()
    with sqlite3.connect(plain_copy / "data" / "target_crm.db") as conn:
        plain_rows = conn.execute(query).fetchall()
        plain_accounts = conn.execute("SELECT external_id, name, phone FROM account ORDER BY 1").fetchall()
    assert accounts == plain_accounts
    hashed = [i for i, row in enumerate(plain_rows) if row[5] == "partner_export"]  # phone is `hash` there
    assert [r for i, r in enumerate(protected_rows) if i not in hashed] == \
           [r for i, r in enumerate(plain_rows) if i not in hashed]
    assert all(protected_rows[i][4] is None or len(protected_rows[i][4]) == 64 for i in hashed)

    # staging holds envelopes, never the values the target received
    mapping = load_mapping(plaintext_demo)
    staging = duckdb.connect(str(run.staging_path), read_only=True)
    try:
        staged = staging.execute("SELECT _ext, first_name, email, email_bidx FROM rows_contacts").fetchall()
    finally:
        staging.close()
    received = {row[0]: row for row in protected_rows}
    protector = protector_for(mapping)
    for ext, first, _, _ in staged[:50]:
        if ext in received and received[ext][1]:
            assert first != received[ext][1]
            assert protector.decrypt_value("contacts", "first_name", first, ext) == received[ext][1]

    # dedup on the blind index = dedup on the plaintext
    by_token: dict[str, set[str]] = {}
    by_plain: dict[str, set[str]] = {}
    for ext, _, email, token in staged:
        if token is None:
            continue
        by_token.setdefault(token, set()).add(ext)
        by_plain.setdefault(normalise(protector.decrypt_value("contacts", "email", email, ext)), set()).add(ext)
    assert sorted(map(sorted, by_token.values())) == sorted(map(sorted, by_plain.values()))
    assert any(len(group) > 1 for group in by_token.values())  # the demo has duplicate people
    assert result["entities"]

    erase_one_subject(plaintext_demo, run)  # on the same run: a flow run less


def erase_one_subject(plaintext_demo: Path, run) -> None:
    """`crmbridge erase --subject` over a finished run: that person's values no longer decrypt anywhere."""
    from typer.testing import CliRunner

    from crmbridge.cli.main import app

    mapping = load_mapping(plaintext_demo)
    staging = duckdb.connect(str(run.staging_path), read_only=True)
    try:
        rows = staging.execute("SELECT _ext, email, phone FROM rows_contacts WHERE email IS NOT NULL").fetchall()
    finally:
        staging.close()
    protector = protector_for(mapping)
    ext, email_token, _ = rows[0]
    email = protector.decrypt_value("contacts", "email", email_token, ext)
    same_person = [r for r in rows if protector.decrypt_value("contacts", "email", r[1], r[0]) == email]
    others = [r for r in rows if r not in same_person][:20]

    outcome = CliRunner().invoke(app, ["erase", str(plaintext_demo), "--subject", email.upper()])
    assert outcome.exit_code == 0, outcome.output
    assert email not in outcome.output and "erased" in outcome.output

    fresh = protector_for(load_mapping(plaintext_demo))
    for row_ext, email_value, phone_value in same_person:
        for field, token in (("email", email_value), ("phone", phone_value)):
            if token is not None:
                with pytest.raises(ErasedSubjectError):
                    fresh.decrypt_value("contacts", field, token, row_ext)
    for row_ext, email_value, _ in others:  # everyone else still decrypts
        assert "@" in fresh.decrypt_value("contacts", "email", email_value, row_ext)
    ref = fresh.keyring.subject_reference(email)
    assert fresh.subjects.find(ref) is None
    # the erasure is in the audit trail by reference, never by value
    with sqlite3.connect(plaintext_demo.parent / ".crmbridge" / "audit.db") as conn:
        events = conn.execute("SELECT * FROM audit_events WHERE action = 'erasure'").fetchall()
    assert len(events) == 1 and ref in str(events) and email not in str(events).lower()
    again = CliRunner().invoke(app, ["erase", str(plaintext_demo), "--subject", email])
    assert again.exit_code == 1 and "already erased" in again.output
