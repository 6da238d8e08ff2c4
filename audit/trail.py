"""A run's view of the audit store: append run-level events, record-level events per batch, and the signed
checkpoint at the end of the run. Events never hold a data value: fields by name, subjects and source keys
as keyed-hash references, errors as reason codes."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import multiprocessing.util  # noqa: F401  (its exit handler must run after ours: LIFO)
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cache
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from crmbridge.audit.canonical import COLUMN_KEYS, canonical, chain_hash, dumps
from crmbridge.audit.merkle import MerkleAccumulator, merkle_root
from crmbridge.audit.signing import Signer
from crmbridge.audit.store import AuditStore, AuditStoreError, Head, sqlite_url
from crmbridge.audit.subjects import SubjectReferencer
from crmbridge.errors import CrmbridgeError
from crmbridge.schemas import load_schema

CHECKPOINT_TYPE = "crmbridge-audit-checkpoint"
# Written through before the call returns: the end of a run, and rare events a command records then exits.
_FINAL = {"run_finished", "rollback_finished", "erasure", "key_rotated", "decryption", "export", "audit_verified",
          "audit_purged", "report_generated"}
_LIVE: weakref.WeakSet[AuditTrail] = weakref.WeakSet()


@atexit.register
def _flush_live_trails() -> None:
    """A caller that never flushes still gets its events written before the interpreter exits."""
    for trail in list(_LIVE):
        with contextlib.suppress(Exception):
            trail.flush()


class AuditEventError(CrmbridgeError):
    """An event does not match schemas/audit_event.schema.json (a programming error: nothing is written)."""


@cache
def _validator() -> Draft202012Validator:
    return Draft202012Validator(load_schema("audit_event"))


def validate_event(event: dict[str, Any]) -> None:
    errors = sorted(_validator().iter_errors(event), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.path) or "(event)"
        # The message names the key and the rule, never the offending value.
        raise AuditEventError(f"audit event `{event.get('action')}` does not match the event schema at "
                              f"{where}: {first.validator} {first.validator_value!r}"[:400])


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


class AuditTrail:
    """Events of one run. `store` is an AuditStore, a SQLAlchemy URL, or a path to a SQLite file."""

    def __init__(self, store: AuditStore | str | Path, run_id: str, mapping_name: str, mapping_sha256: str,
                 actor: str, *, referencer: SubjectReferencer | None = None, signer: Signer | None = None,
                 record_level: bool = True, run_details: dict[str, Any] | None = None, writer: str = "process"):
        if isinstance(store, Path):
            store = AuditStore(sqlite_url(store))
        elif isinstance(store, str):
            store = AuditStore(store)
        self.store = store
        self.run_id = run_id
        self.actor = actor or "unknown"
        self.base = {"mapping": mapping_name, "mapping_sha256": mapping_sha256}
        self.referencer = referencer
        self.signer = signer
        self.record_level = record_level and referencer is not None
        self.run_details = run_details or {}  # purpose, lawful basis, systems: stated on run_started
        self._merkle = MerkleAccumulator()  # this run's events as this process appended them
        self._checked: set[tuple[str, str | None]] = set()
        # Record-level events are written by a writer process of their own (started on the first batch): the
        # flow only pickles the batch's keys and ids over a pipe; references, canonical text, hashes and the
        # SQLite/PostgreSQL insert all run on the other core. Order is kept (one pipe, one writer). Run-level
        # events go through the same writer once it runs, and are written inline before that.
        self._inline = writer == "inline" or not self.record_level
        self._conn: Any = None
        self._process: Any = None
        self._failure: str | None = None
        _LIVE.add(self)

    # --- the writer process ----------------------------------------------------------------------------

    def start_writer(self) -> None:
        """Start the writer process now rather than on the first batch's records: a new interpreter takes
        seconds to import its modules, which a run spends extracting instead of waiting (measured: the
        first record-level send of a 200,000-row run blocked 2.5 s on a writer still starting)."""
        if not self._inline and self._process is None:
            self._start()

    def _start(self) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads (Prefect)
        parent, child = context.Pipe()
        self._process = context.Process(
            target=_writer_main, name=f"crmbridge-audit-{self.run_id}", daemon=True,
            args=(child, self.store.url, self.run_id, self.actor, self.base, self.referencer, self._merkle))
        self._process.start()
        child.close()
        self._conn = parent

    def _send(self, message: tuple) -> None:
        self._raise_failure()
        if self._conn.poll():  # the writer reports a failure as soon as it happens
            self._receive()
        try:
            self._conn.send(message)
        except (BrokenPipeError, EOFError, OSError):
            self._failure = self._failure or "writer process ended"
            self._raise_failure()

    def _receive(self) -> Any:
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            kind, payload = "error", "writer process ended"
        if kind == "error":
            self._failure = payload
            self._raise_failure()
        return payload

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise AuditStoreError(f"the audit trail could not be written ({self._failure}); the run stops rather "
                                  "than go on unaudited")

    def flush(self) -> None:
        """Wait until every event handed over is written; raise if writing failed."""
        if self._process is not None:
            self._send(("flush",))
            self._receive()
        self._raise_failure()

    # --- run-level events ------------------------------------------------------------------------------

    def _append_columns(self, columns: dict[str, Any], extra: str | None) -> None:
        """Write one prepared event now (the writer process's side of `append`)."""

        def build(head: Head) -> tuple[list[tuple], Head]:
            row = {**columns, "seq": head.seq + 1, "details": extra}
            digest = chain_hash(head.hash, canonical(row))
            return [_row(row, head.hash, digest)], Head(head.seq + 1, digest)

        self._merkle.add(self.store.append(build).hash)

    def append(self, action: str, **details: Any) -> None:
        """Append one event: validated now, written in order (`flush` waits for the writer process).

        Events of the actions in `_FINAL` (a run's end, erasures, key events) are written before this returns."""
        event = {"time": utc_now(), "actor": self.actor, "action": action, "run_id": self.run_id, **self.base}
        given = {k: v for k, v in details.items() if v is not None}
        if action in ("run_started", "run_resumed"):
            event.update(self.run_details)
            if isinstance(given.get("details"), dict) and isinstance(event.get("details"), dict):
                given["details"] = {**event["details"], **given["details"]}  # e.g. a sync's kind, with lineage
        event.update(given)
        validate_event({**event, "seq": 1})
        columns = {k: event.pop(k) for k in list(event) if k in COLUMN_KEYS}
        extra = dumps(event) if event else None

        if self._process is not None:
            self._send(("append", columns, extra))
            if action in _FINAL:
                self.flush()
            return
        self._raise_failure()
        self._append_columns(columns, extra)

    # --- record-level events ---------------------------------------------------------------------------

    def records(self, action: str, entity: str, source_keys: Sequence[Any], *,
                target_ids: Sequence[Any] | None = None, subjects: Sequence[Any] | None = None,
                reasons: Sequence[str | None] | None = None, fields: Sequence[Sequence[str] | None] | None = None,
                ) -> int:
        """One event per record, written in one executemany; returns how many. Cheap by design: the
        references are computed in bulk, the canonical text is concatenated from per-batch constants, and all
        of it runs in the writer process (inline for a trail without one)."""
        if not self.record_level or not len(source_keys):
            return 0
        time = utc_now()
        reasons = list(reasons) if reasons is not None else None
        for reason in set(reasons or [None]):  # the shape of every event in the batch, checked once per variant
            if (action, reason) not in self._checked:
                validate_event({"seq": 1, "time": time, "actor": self.actor, "action": action,
                                "run_id": self.run_id, "entity": entity, "source_ref": "0" * 64,
                                "subject_ref": "0" * 64, "target_id": "x", **({"reason": reason} if reason else {})})
                self._checked.add((action, reason))
        arguments = (action, entity, _plain(source_keys), None if target_ids is None else _plain(target_ids),
                     None if subjects is None else _plain(subjects), reasons,
                     None if fields is None else [None if f is None else list(f) for f in fields], time)
        if self._inline:
            self._raise_failure()
            self._write_records(*arguments)
            return len(source_keys)
        if self._process is None:
            self._start()
        self._send(("records", *arguments))
        return len(source_keys)

    def _write_records(self, action: str, entity: str, source_keys: Sequence[Any], target_ids: Sequence[Any] | None,
                       subjects: Sequence[Any] | None, reasons: Sequence[str | None] | None,
                       fields: Sequence[Sequence[str] | None] | None, time: str) -> None:
        assert self.referencer is not None
        count = len(source_keys)
        source_refs = self.referencer.source_refs(entity, source_keys)
        subject_refs = self.referencer.subject_refs(subjects) if subjects is not None else [None] * count
        targets = ([None if t is None else str(t) for t in target_ids] if target_ids is not None
                   else [None] * count)
        reasons = list(reasons) if reasons is not None else [None] * count
        actor, run_id = self.actor, self.run_id
        heads: dict[str | None, str] = {}
        for reason in set(reasons):
            reason_part = f'"reason":{encode_basestring(reason)},' if reason else ""
            heads[reason] = (f'{{"action":{encode_basestring(action)},"actor":{encode_basestring(actor)},'
                             f'"entity":{encode_basestring(entity)},{reason_part}"run_id":'
                             f'{encode_basestring(run_id)},"seq":')
        tail = f',"time":{encode_basestring(time)}}}'
        details = [None if not f else dumps({"fields": list(f)}) for f in fields] if fields is not None else None
        sha256 = hashlib.sha256

        def build(head: Head) -> tuple[list[tuple], Head]:
            rows = []
            prev, seq = head.hash, head.seq
            for i in range(count):
                seq += 1
                sref, subj, target, reason = source_refs[i], subject_refs[i], targets[i], reasons[i]
                extra = details[i] if details is not None else None
                if extra is None:
                    text = (heads[reason] + str(seq)
                            + ("" if sref is None else f',"source_ref":"{sref}"')
                            + ("" if subj is None else f',"subject_ref":"{subj}"')
                            + ("" if target is None else ',"target_id":' + encode_basestring(target)) + tail)
                else:
                    text = canonical({"seq": seq, "time": time, "actor": actor, "action": action, "run_id": run_id,
                                      "entity": entity, "source_ref": sref, "subject_ref": subj,
                                      "target_id": target, "reason": reason, "details": extra})
                raw = sha256((prev + text).encode()).digest()
                digest = raw.hex()
                rows.append((seq, time, actor, action, run_id, entity, sref, subj, target, reason, extra, prev,
                             digest))
                digests.append(raw)
                prev = digest
            return rows, Head(seq, prev)

        digests: list[bytes] = []
        self.store.append(build)
        self._merkle.add_digests(digests)

    # --- checkpoint -------------------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the chain head and the Merkle root of this run's events (None without a signer)."""
        self.flush()
        if self.signer is None:
            return None
        if self._process is not None:
            self._send(("merkle",))
            self._merkle = self._receive()
        head = self.store.head()
        hashes = [h for seq, h in self.store.hashes_of_run(self.run_id) if seq <= head.seq] \
            if self._merkle.size != self.store.count_of_run(self.run_id, head.seq) else None
        root, size = (self._merkle.root(), self._merkle.size) if hashes is None else (merkle_root(hashes),
                                                                                       len(hashes))
        body = dumps({"type": CHECKPOINT_TYPE, "version": 1, "seq": head.seq, "head": head.hash,
                      "run_id": self.run_id, "run_events": size, "merkle_root": root, "time": utc_now(),
                      "key_id": self.signer.key_id, **self.base})
        signature = self.signer.sign(body)
        self.store.add_checkpoint(head.seq, self.run_id, body, signature, self.signer.key_id)
        return {"body": body, "signature": signature, "key_id": self.signer.key_id}

    def close(self) -> None:
        """Write what is pending, stop the writer and release the store."""
        try:
            self.flush()
        finally:
            if self._process is not None:
                with contextlib.suppress(Exception):
                    self._conn.send(("close",))
                self._process.join(timeout=60)
                if self._process.is_alive():  # pragma: no cover - a writer stuck on a lock
                    self._process.terminate()
                self._conn.close()
                self._process = None
            self.store.close()


def _writer_main(conn: Any, url: str, run_id: str, actor: str, base: dict[str, str],
                 referencer: SubjectReferencer | None, merkle: MerkleAccumulator) -> None:
    """The writer process: apply the trail's messages in order; after a failure write nothing more."""
    trail = AuditTrail(url, run_id, base["mapping"], base["mapping_sha256"], actor, referencer=referencer,
                       writer="inline")
    trail._merkle = merkle  # events the parent wrote inline before the writer started
    failure: str | None = None
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return
            kind = message[0]
            if kind == "close":
                return
            if kind in ("flush", "merkle"):
                payload = None if kind == "flush" else trail._merkle
                conn.send(("error", failure) if failure else ("ok", payload))
                continue
            if failure:
                continue
            try:
                if kind == "append":
                    trail._append_columns(*message[1:])
                else:
                    trail._write_records(*message[1:])
            except Exception as error:  # the class name only: a driver's message can echo values
                failure = type(error).__name__
                conn.send(("error", failure))
    finally:
        trail.store.close()


def _plain(values: Any) -> list[Any]:
    """A list of Python values (Arrow arrays and NumPy arrays converted in one call, not element by element)."""
    return values.to_pylist() if hasattr(values, "to_pylist") else values.tolist() if hasattr(values, "tolist") \
        else list(values)


def _row(row: dict[str, Any], prev: str, digest: str) -> tuple:
    return (row["seq"], row["time"], row["actor"], row["action"], row.get("run_id"), row.get("entity"),
            row.get("source_ref"), row.get("subject_ref"), row.get("target_id"), row.get("reason"),
            row.get("details"), prev, digest)
