"""Searching the trail: by data subject (hashed with the project's reference key first, so the value is
never stored or sent to the database), by run, by record (target id or source key), action and time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crmbridge.audit.canonical import COLUMNS, event_of
from crmbridge.audit.store import AuditStore
from crmbridge.audit.subjects import SubjectReferencer


@dataclass(frozen=True)
class Query:
    subject: str | None = None
    run: str | None = None
    record: str | None = None
    action: str | None = None
    since: str | None = None  # ISO 8601 (date or time, UTC)
    until: str | None = None
    limit: int = 1000


def search(store: AuditStore, referencer: SubjectReferencer, entities: list[str], query: Query) -> list[dict[str, Any]]:
    """Matching events in chain order, each with its seq, hash and prev_hash."""
    mark = store.placeholder
    clauses: list[str] = []
    params: list[Any] = []
    if query.subject is not None:
        clauses.append(f"subject_ref = {mark}")
        params.append(referencer.subject_refs([query.subject])[0])
    if query.record is not None:
        refs = [referencer.source_refs(e, [query.record])[0] for e in entities]  # source keys are entity-scoped
        marks = ", ".join([mark] * len(refs))
        clauses.append(f"(target_id = {mark}" + (f" OR source_ref IN ({marks}))" if refs else ")"))
        params += [query.record, *refs]
    if query.run is not None:
        clauses.append(f"run_id = {mark}")
        params.append(query.run)
    if query.action is not None:
        clauses.append(f"action = {mark}")
        params.append(query.action)
    if query.since is not None:
        clauses.append(f"time >= {mark}")
        params.append(query.since)
    if query.until is not None:
        clauses.append(f"time < {mark}")
        params.append(query.until)
    found = []
    for row in store.rows(" AND ".join(clauses), params):
        values = dict(zip(COLUMNS, row, strict=True))
        found.append({**event_of(values), "prev_hash": values["prev_hash"], "hash": values["hash"]})
        if len(found) >= query.limit:
            break
    return found


def lineage(store: AuditStore, events: list[dict[str, Any]]) -> dict[str, Any]:
    """For record events: the runs that touched the record, with the mapping version and, per field, the
    source column, transforms and protection the run stated on run_started."""
    runs: dict[str, Any] = {}
    for event in events:
        run_id = event.get("run_id")
        if not run_id or run_id in runs:
            continue
        started = search(store, _NoRefs(), [], Query(run=run_id, action="run_started", limit=1))
        start = started[0] if started else {}
        entity = event.get("entity")
        runs[run_id] = {
            "mapping": start.get("mapping"), "mapping_sha256": start.get("mapping_sha256"),
            "started": start.get("time"), "actor": start.get("actor"),
            "entity": (start.get("details", {}).get("entities", {}).get(entity) if entity else None),
        }
    return runs


class _NoRefs:
    def subject_refs(self, values):  # pragma: no cover - never asked: lineage looks up by run only
        return [None for _ in values]

    def source_refs(self, entity, keys):  # pragma: no cover
        return [None for _ in keys]
