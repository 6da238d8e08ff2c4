"""The audit store's integrity: canonical form, hash chain, tamper detection at the right position on SQLite
and PostgreSQL, append-only enforcement, concurrent appends, signed checkpoints and inclusion proofs."""

from __future__ import annotations

import json
import os
import random
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from crmbridge.audit.canonical import COLUMNS, canonical, canonical_row, dumps, event_of
from crmbridge.audit.merkle import inclusion_proof, merkle_root, verify_inclusion
from crmbridge.audit.signing import Signer, public_pem
from crmbridge.audit.store import AuditStore, AuditStoreError
from crmbridge.audit.subjects import HmacReferencer
from crmbridge.audit.trail import AuditEventError, AuditTrail
from crmbridge.audit.verify import export_lines, verify_export, verify_proof, verify_store

KEY = bytes(range(32))


def _trail(store: AuditStore, signer: Signer, run_id: str = "run-1", writer: str = "inline") -> AuditTrail:
    return AuditTrail(store, run_id, "demo", "a" * 64, "alice", referencer=HmacReferencer(KEY), signer=signer,
                      writer=writer)


def _fill(store: AuditStore, signer: Signer, run_id: str = "run-1", rows: int = 12) -> AuditTrail:
    """run_started, a batch of record events, a quarantine, run_finished and the signed checkpoint."""
    trail = _trail(store, signer, run_id)
    trail.append("run_started", dry_run=False, entities=["contacts"], purpose="migration", lawful_basis="contract")
    trail.records("record_created", "contacts", [str(i) for i in range(rows)],
                  target_ids=[f"t-{i}" for i in range(rows)], subjects=[f"p{i}@example.com" for i in range(rows)])
    trail.records("record_quarantined", "contacts", ["99", None], reasons=["pattern_mismatch", "missing_key"])
    trail.append("batch_loaded", entity="contacts", first_seq=0, last_seq=rows - 1, created=rows, updated=0,
                 unchanged=0, quarantined=2, fields=["email", "name"])
    trail.append("run_finished", outcome="succeeded")
    trail.checkpoint()
    return trail


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.from_file(tmp_path / "keys" / "signing.key")


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'audit.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened = AuditStore(url)
    yield opened
    opened.close()


# --- canonical form ----------------------------------------------------------------------------------------


def test_fast_canonical_text_is_exactly_sorted_compact_json() -> None:
    rng = random.Random(7)
    awkward = ["plain", 'quote " and \\ backslash', "控制 unicode", "tab\tnew\nline", "\u2028", "emoji 😀", ""]
    for _ in range(300):
        row = {c: None for c in COLUMNS}
        row.update(seq=rng.randrange(1, 10**9), time="2026-11-23T10:00:00.123456+00:00",
                   actor=rng.choice(awkward) or "x", action="record_created")
        for key in ("run_id", "entity", "source_ref", "subject_ref", "target_id", "reason"):
            if rng.random() < 0.7:
                row[key] = rng.choice(awkward)
        expected = json.dumps({k: v for k, v in row.items() if v is not None and k in event_of(row)},
                              sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert canonical(row) == expected
        assert canonical_row(tuple(row[c] for c in COLUMNS)) == expected
        assert json.loads(canonical(row)) == {k: v for k, v in row.items()
                                              if v is not None and k not in ("details", "prev_hash", "hash")}


def test_record_events_hash_the_same_text_verify_recomputes(tmp_path: Path, signer: Signer) -> None:
    """The writer's concatenated text and the verifier's generic canonical form agree for every row."""
    store = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    trail = _fill(store, signer)
    trail.records("record_updated", "contacts", ["1"], target_ids=['t "1"'], fields=[["email", "name"]])
    trail.flush()
    result = verify_store(store, signer.public)
    assert result.ok, result.findings
    assert result.events == store.count() == 12 + 2 + 3 + 1
    updated = [event_of(dict(zip(COLUMNS, r, strict=True))) for r in store.rows("action = 'record_updated'")]
    assert updated[0]["fields"] == ["email", "name"] and updated[0]["target_id"] == 't "1"'
    trail.close()


def test_events_are_validated_on_write_and_nothing_is_written(tmp_path: Path, signer: Signer) -> None:
    store = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    trail = _trail(store, signer)
    with pytest.raises(AuditEventError, match=r"at action: enum"):
        trail.append("not_an_action")
    with pytest.raises(AuditEventError, match="reason"):
        trail.append("run_finished", outcome="failed", reason="duplicate key value violates 'x@y.com'")
    with pytest.raises(AuditEventError, match="outcome"):
        trail.append("run_finished", outcome="maybe")
    trail.flush()
    assert store.count() == 0
    trail.close()


def test_references_are_keyed_hashes_never_the_value(tmp_path: Path, signer: Signer) -> None:
    store = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    _fill(store, signer).close()
    raw = (tmp_path / "a.db").read_bytes()
    for i in range(12):
        assert f"p{i}@example.com".encode() not in raw
    referencer = HmacReferencer(KEY)
    assert referencer.subject_refs([" P3@Example.COM "]) == referencer.subject_refs(["p3@example.com"])
    assert HmacReferencer(bytes(32)).subject_refs(["p3@example.com"]) != referencer.subject_refs(["p3@example.com"])
    assert referencer.source_refs("contacts", ["3"]) != referencer.source_refs("accounts", ["3"])
    import hmac

    from crmbridge.audit.subjects import hmac_sha256_hex

    for key in (b"k" * 16, bytes(range(32)), os.urandom(64), os.urandom(100)):
        for message in (b"", b"source\x00contacts\x003", "控制".encode() * 50):
            assert hmac_sha256_hex(key)(message) == hmac.digest(key, message, "sha256").hex()


# --- tampering -------------------------------------------------------------------------------------------


def _raw(store: AuditStore):
    """A connection as an attacker with the database owner's rights: the append-only guards switched off."""
    conn = store.engine.connect()
    if store.dialect == "sqlite":
        for (name,) in conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            conn.exec_driver_sql(f"DROP TRIGGER {name}")
    else:
        conn.exec_driver_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
    conn.commit()
    return conn


def _row(conn, seq: int) -> dict:
    result = conn.execute(sa.text(f"SELECT {', '.join(COLUMNS)} FROM audit_events WHERE seq = :s"), {"s": seq})
    return dict(result.mappings().one())


def _insert(conn, row: dict) -> None:
    conn.execute(sa.text(f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES "
                         f"({', '.join(':' + c for c in COLUMNS)})"), row)


def _shift_up(conn, from_seq: int) -> None:
    """Renumber events from `from_seq` on by one, making room for an inserted event (two steps: unique key)."""
    conn.execute(sa.text("UPDATE audit_events SET seq = seq + 1000000 WHERE seq >= :s"), {"s": from_seq})
    conn.execute(sa.text("UPDATE audit_events SET seq = seq - 999999 WHERE seq >= 1000000"))


TAMPERS = ["alter", "alter_hash_only", "delete", "insert", "insert_forged", "reorder", "append_fake",
           "truncate", "rewrite_chain"]


@pytest.mark.parametrize("tamper", TAMPERS)
def test_verify_catches_tampering_at_the_right_position(store: AuditStore, signer: Signer, tamper: str) -> None:
    _fill(store, signer, rows=12).close()
    assert verify_store(store, signer.public).ok
    last = store.count()
    k = 7  # a record event in the middle
    conn = _raw(store)
    with conn.begin():
        if tamper == "alter":
            conn.execute(sa.text("UPDATE audit_events SET target_id = 't-999' WHERE seq = :s"), {"s": k})
        elif tamper == "alter_hash_only":
            conn.execute(sa.text("UPDATE audit_events SET hash = :h WHERE seq = :s"), {"h": "f" * 64, "s": k})
        elif tamper == "delete":
            conn.execute(sa.text("DELETE FROM audit_events WHERE seq = :s"), {"s": k})
        elif tamper == "insert":  # a copy of an existing event slipped in before k
            copy = _row(conn, k - 1)
            _shift_up(conn, k)
            _insert(conn, {**copy, "seq": k})
        elif tamper == "insert_forged":  # a well-formed event whose own hash is right: the next link breaks
            before = _row(conn, k - 1)
            _shift_up(conn, k)
            fake = {**before, "seq": k, "target_id": "t-forged", "prev_hash": before["hash"]}
            from crmbridge.audit.canonical import chain_hash

            fake["hash"] = chain_hash(fake["prev_hash"], canonical(fake))
            _insert(conn, fake)
        elif tamper == "reorder":  # two events swap places (their seq numbers stay)
            a, b = _row(conn, k), _row(conn, k + 1)
            conn.execute(sa.text("DELETE FROM audit_events WHERE seq IN (:a, :b)"), {"a": k, "b": k + 1})
            _insert(conn, {**b, "seq": k})
            _insert(conn, {**a, "seq": k + 1})
        elif tamper == "append_fake":
            tail = _row(conn, last)
            _insert(conn, {**tail, "seq": last + 1, "prev_hash": "0" * 64})
        elif tamper == "truncate":  # the last events removed: only the signed checkpoint knows
            conn.execute(sa.text("DELETE FROM audit_events WHERE seq >= :s"), {"s": last - 1})
        elif tamper == "rewrite_chain":  # alter k and recompute every hash after it: a consistent forgery
            from crmbridge.audit.canonical import chain_hash

            rows = [dict(r) for r in conn.execute(sa.text(
                f"SELECT {', '.join(COLUMNS)} FROM audit_events ORDER BY seq")).mappings()]
            conn.execute(sa.text("DELETE FROM audit_events"))
            prev = "0" * 64
            for row in rows:
                if row["seq"] == k:
                    row["target_id"] = "t-rewritten"
                row["prev_hash"] = prev
                row["hash"] = prev = chain_hash(prev, canonical(row))
                _insert(conn, row)
    conn.close()
    result = verify_store(store, signer.public)
    assert not result.ok
    expected = {"alter": k, "alter_hash_only": k, "delete": k, "insert": k, "insert_forged": k + 1, "reorder": k,
                "append_fake": last + 1, "truncate": last - 1, "rewrite_chain": last}[tamper]
    assert result.first_bad == expected, result.findings
    kinds = {f.kind for f in result.findings}
    if tamper == "truncate":
        assert "truncated" in kinds
    if tamper == "rewrite_chain":  # every link is consistent; the signed head and Merkle root are not
        assert kinds == {"checkpoint"}


def test_the_database_refuses_update_delete_and_truncate(store: AuditStore, signer: Signer) -> None:
    _fill(store, signer).close()
    statements = ["UPDATE audit_events SET actor = 'mallory' WHERE seq = 2", "DELETE FROM audit_events WHERE seq = 2",
                  "UPDATE audit_checkpoints SET signature = 'x'", "DELETE FROM audit_checkpoints"]
    if store.dialect == "postgresql":
        statements.append("TRUNCATE audit_events")
    for statement in statements:
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as conn:
            conn.exec_driver_sql(statement)
    assert verify_store(store, signer.public).ok


def test_concurrent_runs_keep_one_valid_chain(store: AuditStore, signer: Signer) -> None:
    """Eight writers (threads, each with its own trail and connection; two through writer processes) append
    at once."""
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            trail = _trail(AuditStore(store.url), signer, f"run-{n}", writer="process" if n < 2 else "inline")
            for batch in range(5):
                trail.append("batch_staged", entity="contacts", batch=batch, source_rows=20, staged=20, quarantined=0)
                trail.records("record_created", "contacts", [f"{n}-{batch}-{i}" for i in range(20)],
                              target_ids=[f"t{n}-{batch}-{i}" for i in range(20)])
            trail.append("run_finished", outcome="succeeded")
            trail.checkpoint()
            trail.close()
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    result = verify_store(store, signer.public)
    assert result.ok, result.findings[:3]
    assert result.events == 8 * (5 * 21 + 1) and result.checkpoints == 8
    seqs = [r[0] for r in store.rows()]
    assert seqs == list(range(1, len(seqs) + 1))


# --- checkpoints, export, proofs ----------------------------------------------------------------------------


def test_exported_log_and_checkpoint_verify_with_only_the_public_key(tmp_path: Path, signer: Signer) -> None:
    store = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    _fill(store, signer, "run-1").close()
    _fill(store, signer, "run-2").close()
    exported = tmp_path / "export.jsonl"
    exported.write_text("\n".join(export_lines(store, public_pem(signer.public))) + "\n")
    pem = public_pem(signer.public)
    assert verify_export(exported, pem).ok

    other = Signer.from_file(tmp_path / "other.key")
    wrong = verify_export(exported, public_pem(other.public))
    assert not wrong.ok and {f.kind for f in wrong.findings} == {"signature"}

    lines = exported.read_text().splitlines()
    event_lines = [i for i, line in enumerate(lines) if '"seq"' in line and '"type"' not in line]
    cut = "\n".join(lines[: event_lines[-3]] + [line for line in lines if '"type": "checkpoint"' in line]) + "\n"
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text(cut)
    result = verify_export(truncated, pem)
    assert not result.ok and "truncated" in {f.kind for f in result.findings}


def test_inclusion_proofs(tmp_path: Path, signer: Signer) -> None:
    for size in (1, 2, 3, 5, 8, 13, 64, 100):
        hashes = [os.urandom(32).hex() for _ in range(size)]
        root = merkle_root(hashes)
        for index in range(size):
            proof = inclusion_proof(hashes, index)
            assert verify_inclusion(hashes[index], index, size, proof, root)
            assert not verify_inclusion(os.urandom(32).hex(), index, size, proof, root)

    store = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    _fill(store, signer, "run-1").close()
    _fill(store, signer, "run-2").close()
    cp = next(c for c in store.checkpoints() if c["run_id"] == "run-2")
    run_hashes = [h for _, h in store.hashes_of_run("run-2")]
    seqs = [s for s, _ in store.hashes_of_run("run-2")]
    assert json.loads(cp["body"])["merkle_root"] == merkle_root(run_hashes)
    index = 5
    event = dict(zip(COLUMNS, next(iter(store.rows(first_seq=seqs[index], last_seq=seqs[index]))), strict=True))
    proof = {"event": event, "index": index, "path": inclusion_proof(run_hashes, index),
             "checkpoint": {k: cp[k] for k in ("body", "signature", "key_id")}}
    pem = public_pem(signer.public)
    assert verify_proof(proof, pem) == []
    forged = {**proof, "event": {**event, "target_id": "t-other"}}
    assert any("does not match its hash" in p for p in verify_proof(forged, pem))
    assert verify_proof({**proof, "checkpoint": {**proof["checkpoint"], "body": dumps({"x": 1})}}, pem)


def test_the_writer_process_writes_in_order_and_reports_a_failure(tmp_path: Path, signer: Signer) -> None:
    store = AuditStore(f"sqlite:///{tmp_path / 'a.db'}")
    trail = _trail(store, signer, writer="process")
    trail.append("run_started", dry_run=False)  # inline: the writer starts with the first record batch
    for batch in range(3):
        trail.records("record_created", "contacts", [f"{batch}-{i}" for i in range(500)],
                      target_ids=[f"t{batch}-{i}" for i in range(500)])
        trail.append("batch_loaded", entity="contacts", created=500)
    trail.append("run_finished", outcome="succeeded")  # written through: visible at once
    assert store.count() == 1 + 3 * 501 + 1
    cp = json.loads(trail.checkpoint()["body"])
    assert cp["run_events"] == store.count() and verify_store(store, signer.public).ok
    with store.engine.begin() as conn:  # the store breaks under the writer
        conn.exec_driver_sql("ALTER TABLE audit_events RENAME TO gone")
    trail.records("record_created", "contacts", ["x"], target_ids=["y"])
    with pytest.raises(AuditStoreError, match=r"could not be written \(OperationalError\)"):
        trail.flush()
    with pytest.raises(AuditStoreError):
        trail.records("record_created", "contacts", ["z"])
    with pytest.raises(AuditStoreError):
        trail.close()
