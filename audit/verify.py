"""Verification: recompute the hash chain, check every signed checkpoint (signature, chain head, Merkle
root of its run, truncation) and the archive anchor. Works on the live store or on an exported file, so a
third party holding only the public key can check the log."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from crmbridge.audit.canonical import COLUMNS, GENESIS, canonical, canonical_row, chain_hash
from crmbridge.audit.merkle import MerkleAccumulator, verify_inclusion
from crmbridge.audit.signing import load_public_key, verify_signature
from crmbridge.audit.store import AuditStore

EXPORT_TYPE = "crmbridge-audit-export"
MAX_FINDINGS = 50


@dataclass(frozen=True)
class Finding:
    seq: int | None
    kind: str  # altered | broken_link | missing | out_of_order | truncated | checkpoint | signature | anchor
    message: str


@dataclass
class VerifyResult:
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    head: str | None = None
    checkpoints: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def first_bad(self) -> int | None:
        seqs = [f.seq for f in self.findings if f.seq is not None]
        return min(seqs) if seqs else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "first_bad": self.first_bad}


def verify_rows(rows: Iterable[tuple], checkpoints: list[dict[str, Any]], anchor: dict[str, Any] | None,
                public_key: Ed25519PublicKey | None) -> VerifyResult:
    result = VerifyResult()
    found = result.findings

    def note(seq: int | None, kind: str, message: str) -> None:
        if len(found) < MAX_FINDINGS:
            found.append(Finding(seq, kind, message))

    expected, prev = (anchor["upto_seq"] + 1, anchor["hash"]) if anchor else (1, GENESIS)
    if anchor and public_key is not None and not verify_signature(public_key, anchor["body"], anchor["signature"]):
        note(anchor["upto_seq"], "anchor", "the archive anchor's signature does not verify")

    # Each checkpoint covers the chain up to its seq and its run's events up to there.
    pending: list[tuple[int, dict[str, Any], dict[str, Any]]] = []
    for cp in checkpoints:
        body = json.loads(cp["body"])
        result.checkpoints += 1
        if public_key is not None and not verify_signature(public_key, cp["body"], cp["signature"]):
            note(body.get("seq"), "signature", f"checkpoint for run {body.get('run_id')} at seq {body.get('seq')}: "
                 "the signature does not verify with this public key")
        if anchor and body["seq"] <= anchor["upto_seq"]:
            continue  # its events were archived
        pending.append((body["seq"], body, cp))
    pending.sort(key=lambda p: p[0])
    runs = {body["run_id"]: MerkleAccumulator() for _, body, _ in pending}
    leaves: dict[str, list[bytes]] = {run_id: [] for run_id in runs}  # added to `runs` in chunks
    position = 0

    def settle(upto: int, hash_at: str | None) -> None:
        nonlocal position
        while position < len(pending) and pending[position][0] <= upto:
            seq, body, _ = pending[position]
            runs[body["run_id"]].add_digests(leaves[body["run_id"]])
            leaves[body["run_id"]] = []
            if seq == upto and hash_at != body["head"]:
                note(seq, "checkpoint", f"the chain at seq {seq} differs from the signed checkpoint of run "
                     f"{body['run_id']}: events up to seq {seq} were rewritten")
            accumulator = runs[body["run_id"]]
            if accumulator.size != body["run_events"] or accumulator.root() != body["merkle_root"]:
                note(seq, "checkpoint", f"run {body['run_id']}: its events up to seq {seq} do not match the "
                     f"signed Merkle root ({accumulator.size} events found, {body['run_events']} signed)")
            position += 1

    for row in rows:
        seq, run_id, stored_prev, stored_hash = row[0], row[4], row[11], row[12]
        if result.first_seq is None:
            result.first_seq = seq
        if seq != expected:
            if seq > expected:
                note(expected, "missing", f"events {expected}..{seq - 1} are missing (deleted)")
            else:
                note(seq, "out_of_order", f"event {seq} appears after {expected - 1} (inserted or reordered)")
        if stored_prev != prev:
            note(seq, "broken_link", f"event {seq} does not link to the event before it: an event was "
                 "deleted, inserted or reordered just before it, or it was altered")
        if sha256((stored_prev + canonical_row(row)).encode()).hexdigest() != stored_hash:
            note(seq, "altered", f"event {seq} was altered: its content does not match its hash")
        if run_id in leaves:
            run_leaves = leaves[run_id]
            run_leaves.append(_digest(stored_hash))
            if len(run_leaves) >= 50_000:
                runs[run_id].add_digests(run_leaves)
                leaves[run_id] = []
        if position < len(pending) and pending[position][0] <= seq:
            settle(seq, stored_hash)
        prev, expected = stored_hash, seq + 1
        result.events += 1
        result.last_seq, result.head = seq, stored_hash
    if position < len(pending):
        seq = pending[position][0]
        note((result.last_seq or 0) + 1, "truncated", f"the log ends at seq {result.last_seq or 0} but a signed "
             f"checkpoint covers seq {seq}: events were removed from the end")
    return result


def _digest(event_hash: str | None) -> bytes:
    try:
        return bytes.fromhex(event_hash or "")
    except ValueError:  # a hash column altered into something that is not hex: still a leaf, never a match
        return (event_hash or "").encode()


def verify_store(store: AuditStore, public_key: Ed25519PublicKey | None) -> VerifyResult:
    return verify_rows(store.rows(), store.checkpoints(), store.anchor(), public_key)


# --- export files ------------------------------------------------------------------------------------------


def export_lines(store: AuditStore, public_pem: str | None, first_seq: int | None = None,
                 last_seq: int | None = None, anchor: dict[str, Any] | None = None) -> Iterator[str]:
    """The log as JSON Lines: a header (anchor to start from), the events, then the checkpoints."""
    if anchor is None and first_seq is None:
        anchor = store.anchor()
    yield json.dumps({"type": EXPORT_TYPE, "version": 1, "anchor": anchor, "public_key": public_pem})
    for row in store.rows(first_seq=first_seq, last_seq=last_seq):
        yield json.dumps(dict(zip(COLUMNS, row, strict=True)), ensure_ascii=False)
    for cp in store.checkpoints():
        if (first_seq is None or cp["seq"] >= first_seq) and (last_seq is None or cp["seq"] <= last_seq):
            yield json.dumps({"type": "checkpoint", **{k: cp[k] for k in ("body", "signature", "key_id")}})


def read_export(path: Path) -> tuple[dict[str, Any], list[tuple], list[dict[str, Any]]]:
    header: dict[str, Any] | None = None
    rows, cps = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not a JSON line") from None
            if header is None:
                if item.get("type") != EXPORT_TYPE:
                    raise ValueError(f"{path}:1: not a crmbridge audit export (expected type {EXPORT_TYPE})")
                header = item
            elif item.get("type") == "checkpoint":
                cps.append(item)
            else:
                rows.append(tuple(item.get(c) for c in COLUMNS))
    if header is None:
        raise ValueError(f"{path}: empty file")
    return header, rows, cps


def verify_export(path: Path, public_pem: str) -> VerifyResult:
    """Verify an exported log with a public key the verifier holds (not the one inside the file)."""
    header, rows, cps = read_export(path)
    return verify_rows(rows, cps, header.get("anchor"), load_public_key(public_pem))


def verify_proof(proof: dict[str, Any], public_pem: str) -> list[str]:
    """Check an inclusion proof: the checkpoint's signature, the event's own hash, and its Merkle path.
    Returns the problems found (empty when the event is proven to be in the signed run)."""
    problems = []
    cp = proof["checkpoint"]
    if not verify_signature(load_public_key(public_pem), cp["body"], cp["signature"]):
        problems.append("the checkpoint's signature does not verify with this public key")
    body = json.loads(cp["body"])
    if not {"run_id", "run_events", "merkle_root"} <= set(body):
        return [*problems, "the checkpoint is not a crmbridge run checkpoint"]
    event = proof["event"]
    row = {c: event.get(c) for c in COLUMNS}
    if chain_hash(row["prev_hash"], canonical(row)) != row["hash"]:
        problems.append(f"event {row['seq']}: its content does not match its hash")
    if row["run_id"] != body["run_id"]:
        problems.append(f"event {row['seq']} belongs to run {row['run_id']}, the checkpoint to {body['run_id']}")
    if not verify_inclusion(row["hash"], proof["index"], body["run_events"], proof["path"], body["merkle_root"]):
        problems.append(f"event {row['seq']} is not included under the checkpoint's Merkle root")
    return problems
