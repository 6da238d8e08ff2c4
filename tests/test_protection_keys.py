"""`crmbridge keys` end to end on a ciphertext target: rotate, re-encrypt in resumable batches, retire;
nothing is lost and a retired key no longer decrypts. Also the audit seam: subject references."""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crmbridge.cli.main import app
from crmbridge.mappings import load_mapping
from crmbridge.protection import KeyringReferencer, RetiredKeyError, envelope, subject_reference
from crmbridge.protection.keyring import open_keyring
from crmbridge.protection.policy import Protector
from crmbridge.protection.reencrypt import reencrypt_table, stale

MAPPING = """\
version: 1
name: keys-demo
protection: {keyring: keys/ring.json, master_key_env: KEYS_DEMO_MASTER}
sources:
  legacy: {type: sql, url: "sqlite:///legacy.db"}
targets:
  crm: {type: sql, url: "sqlite:///crm.db", receives: ciphertext}
entities:
  - name: contacts
    source: legacy
    table: contacts
    key: id
    target: crm
    target_table: contact
    fields:
      email: {from: email, protect: blind_index}
      phone: {from: phone, protect: encrypt}
      city: {from: city, protect: deterministic}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KEYS_DEMO_MASTER", base64.b64encode(os.urandom(32)).decode())
    (tmp_path / "mapping.yaml").write_text(MAPPING)
    with sqlite3.connect(tmp_path / "crm.db") as conn:
        conn.execute("CREATE TABLE contact (external_id TEXT PRIMARY KEY, email TEXT, email_bidx TEXT, phone TEXT, "
                     "city TEXT)")
    return tmp_path


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _write_rows(project: Path, protector: Protector, start: int, count: int) -> dict[str, tuple[str, str, str]]:
    plain = {f"ext-{i:04d}": (f"user{i}@example.com", f"1380000{i:04d}", ["北京", "上海", "Berlin"][i % 3])
             for i in range(start, start + count)}
    exts = list(plain)
    columns = list(zip(*plain.values(), strict=True))
    email = protector.encrypt_values("contacts", "email", list(columns[0]), exts)
    phone = protector.encrypt_values("contacts", "phone", list(columns[1]), exts)
    key = protector.keyring.current("siv")
    from crmbridge.protection import siv

    city = siv.seal_many(protector.keyring.siv(key.id), key.id, list(columns[2]), siv.associated("contacts", "city"))
    with sqlite3.connect(project / "crm.db") as conn:
        conn.executemany("INSERT INTO contact VALUES (?, ?, NULL, ?, ?)",
                         list(zip(exts, email, phone, city, strict=True)))
    return plain


def _read_all(project: Path, protector: Protector) -> dict[str, tuple[str, str, str]]:
    with sqlite3.connect(project / "crm.db") as conn:
        rows = conn.execute("SELECT external_id, email, phone, city FROM contact").fetchall()
    return {ext: tuple(protector.decrypt_value("contacts", f, v, ext) for f, v in
                       zip(("email", "phone", "city"), values, strict=True)) for ext, *values in rows}


def _protector(project: Path) -> Protector:
    return Protector(open_keyring(project / "keys" / "ring.json", "KEYS_DEMO_MASTER"))


def test_rotate_reencrypt_resume_retire(project: Path) -> None:
    mapping_file = str(project / "mapping.yaml")
    assert "created" in cli("keys", "init", mapping_file)
    listing = cli("keys", "list", mapping_file)
    assert "data" in listing and "kek" in listing
    assert os.environ["KEYS_DEMO_MASTER"] not in listing
    before = _write_rows(project, _protector(project), 0, 250)

    assert "key 4 is the current data key" in cli("keys", "rotate", mapping_file)
    assert "key 5 is the current siv key" in cli("keys", "rotate", mapping_file, "--kind", "siv")
    protector = _protector(project)
    before |= _write_rows(project, protector, 250, 50)  # new writes use the new keys
    with sqlite3.connect(project / "crm.db") as conn:
        newest = conn.execute("SELECT phone FROM contact WHERE external_id = 'ext-0299'").fetchone()[0]
    assert envelope.header(envelope.unb64(newest))[1] == 4
    assert _read_all(project, protector) == before  # old ciphertext still decrypts

    # re-encrypt, interrupted after two batches, then resumed by the CLI from the checkpoint
    mapping = load_mapping(project / "mapping.yaml")
    from crmbridge.connectors.sql import SqlConnector

    engine = SqlConnector(mapping.targets["crm"], mapping).engine_for("target")
    checkpoint = mapping.state_dir / "reencrypt" / "contacts.json"
    first = reencrypt_table(protector, engine, mapping.entity("contacts"), checkpoint, batch_size=60,
                            stop_after_batches=2)
    engine.dispose()
    assert (first.rows_read, first.values_rewritten) == (120, 360) and checkpoint.exists()
    output = cli("keys", "reencrypt", mapping_file, "--batch-size", "60")
    assert "resumed" in output and "180 rows read, 390 values re-encrypted" in output.replace("\n", " ")
    assert not checkpoint.exists()
    with sqlite3.connect(project / "crm.db") as conn:
        stored = conn.execute("SELECT email, phone, city FROM contact").fetchall()
    assert not any(stale(protector, v) for row in stored for v in row)

    assert "retired" in cli("keys", "retire", mapping_file, "1")
    assert "retired" in cli("keys", "retire", mapping_file, "2")
    after = _protector(project)
    assert _read_all(project, after) == before  # nothing lost
    old = _protector(project)
    with pytest.raises(RetiredKeyError):
        old.keyring.gcm(1)
    refused = CliRunner().invoke(app, ["keys", "retire", mapping_file, "4"])
    assert refused.exit_code == 1 and "rotate first" in refused.output


def test_subject_references_for_the_audit_trail(project: Path) -> None:
    cli("keys", "init", str(project / "mapping.yaml"))
    mapping = load_mapping(project / "mapping.yaml")
    ref = subject_reference(mapping, "Li.Wei@Example.com ")
    assert len(ref) == 64 and ref == subject_reference(mapping, "li.wei@example.com")
    assert "example" not in ref
    referencer = KeyringReferencer(_protector(project).keyring)
    assert referencer.subject_refs(["li.wei@example.com", None, ""]) == [ref, None, None]
    first, second = referencer.source_refs("contacts", [1, 2])
    assert first != second and referencer.source_refs("accounts", [1])[0] != first


def test_erase_clears_blind_index_entries_in_a_ciphertext_target(project: Path) -> None:
    """Erasure destroys the subject key and the subject's tokens in targets that hold them."""
    import pandas as pd

    from crmbridge.protection import ErasedSubjectError
    from crmbridge.protection.policy import forget_protectors, protector_for

    text = (project / "mapping.yaml").read_text().replace("    fields:\n", "    subject: email\n    fields:\n")
    (project / "mapping.yaml").write_text(text)
    cli("keys", "init", str(project / "mapping.yaml"))
    mapping = load_mapping(project / "mapping.yaml")
    entity = mapping.entity("contacts")
    emails = ["ann@x.cn", "bob@x.cn", "Ann@X.cn", "cy@x.cn"]
    frame = pd.DataFrame({"_row": range(4), "_key": ["1", "2", "3", "4"], "_ext": [f"e{i}" for i in range(4)],
                          "email": emails, "email_bidx": [None] * 4, "phone": ["1", "2", "3", "4"],
                          "city": ["a", "b", "c", "d"]})
    protector = protector_for(mapping)
    staged = protector.protect_frame(entity, frame)
    width = 2 * mapping.protection.index_bytes
    with sqlite3.connect(project / "crm.db") as conn:
        conn.executemany("INSERT INTO contact VALUES (?, ?, ?, ?, ?)",
                         [(ext, email, token[:width], phone, city) for ext, email, token, phone, city in
                          staged[["_ext", "email", "email_bidx", "phone", "city"]].itertuples(index=False)])
    forget_protectors()

    output = cli("erase", str(project / "mapping.yaml"), "--subject", "ANN@x.cn")
    assert "2 blind-index entries cleared" in output and "ann@" not in output.lower()
    with sqlite3.connect(project / "crm.db") as conn:
        rows = dict(conn.execute("SELECT external_id, email_bidx FROM contact").fetchall())
    assert rows["e0"] is None and rows["e2"] is None and rows["e1"] and rows["e3"]
    fresh = protector_for(load_mapping(project / "mapping.yaml"))
    for i in (0, 2):
        with pytest.raises(ErasedSubjectError):
            fresh.decrypt_value("contacts", "phone", staged["phone"][i], f"e{i}")
    assert fresh.decrypt_value("contacts", "phone", staged["phone"][1], "e1") == "2"
    forget_protectors()
