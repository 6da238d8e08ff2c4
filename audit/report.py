"""Reports for a compliance officer, for one run or a period: run summaries, counts per entity, rejects by
reason, personal-data fields touched and how they were protected, key usage, erasures and the verification
status. One aggregation, three renderings: self-contained HTML (jinja2, inline CSS), CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from crmbridge.audit.canonical import COLUMNS, event_of
from crmbridge.audit.store import AuditStore
from crmbridge.audit.verify import VerifyResult

_RUN_LEVEL = ("run_started", "run_resumed", "run_finished", "erasure", "decryption", "key_rotated", "audit_purged",
              "rollback_started", "rollback_finished", "export", "audit_verified")


def build(store: AuditStore, verification: VerifyResult | None, run: str | None = None, since: str | None = None,
          until: str | None = None) -> dict[str, Any]:
    mark = store.placeholder
    clauses, params = [], []
    if run:
        clauses.append(f"run_id = {mark}")
        params.append(run)
    if since:
        clauses.append(f"time >= {mark}")
        params.append(since)
    if until:
        clauses.append(f"time < {mark}")
        params.append(until)
    where = " AND ".join(clauses)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rejects: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    sql = "SELECT entity, action, reason, count(*) FROM audit_events"
    sql += f" WHERE {where} AND " if where else " WHERE "
    sql += "action LIKE 'record%' GROUP BY entity, action, reason ORDER BY entity, action, reason"
    with store.engine.connect() as conn:
        for entity, action, reason, n in conn.exec_driver_sql(sql, tuple(params)):
            counts[entity or ""][action.removeprefix("record_")] += n
            if action == "record_quarantined":
                rejects[entity or ""][reason or "unknown"] += n
    marks = ", ".join([mark] * len(_RUN_LEVEL))
    level = f"action IN ({marks})"
    runs: dict[str, dict[str, Any]] = {}
    fields: dict[tuple[str, str], dict[str, Any]] = {}
    erasures, keys = [], defaultdict(int)
    for row in store.rows(f"{where} AND {level}" if where else level, [*params, *_RUN_LEVEL]):
        event = event_of(dict(zip(COLUMNS, row, strict=True)))
        action = event["action"]
        if event.get("key_id"):
            keys[f"{event['key_id']} ({action})"] += 1
        if action == "erasure":
            erasures.append({k: event.get(k) for k in ("seq", "time", "actor", "subject_ref", "entity", "outcome")})
        run_id = event.get("run_id")
        if not run_id or not action.startswith("run_"):
            continue
        info = runs.setdefault(run_id, {"run_id": run_id, "mapping": event.get("mapping"),
                                        "mapping_sha256": event.get("mapping_sha256"), "actor": event.get("actor"),
                                        "started": None, "finished": None, "outcome": "unfinished", "purpose": None,
                                        "lawful_basis": None, "totals": {}})
        if action in ("run_started", "run_resumed"):
            info["started"] = info["started"] or event["time"]
            info["purpose"] = event.get("purpose") or info["purpose"]
            info["lawful_basis"] = event.get("lawful_basis") or info["lawful_basis"]
            for entity, spec in (event.get("details", {}).get("entities") or {}).items():
                for name, field in (spec.get("fields") or {}).items():
                    if field.get("personal_data") or field.get("protect", "none") != "none":
                        fields[(entity, name)] = {"entity": entity, "field": name,
                                                  "category": field.get("personal_data") or "",
                                                  "protection": field.get("protect", "none")}
        elif action == "run_finished":
            info["finished"], info["outcome"] = event["time"], event.get("outcome", "")
            info["totals"] = event.get("totals") or {}
    for cp in store.checkpoints():
        body = json.loads(cp["body"])
        if (not run or body.get("run_id") == run) and (not since or body["time"] >= since) and \
                (not until or body["time"] < until):
            keys[f"{cp['key_id']} (checkpoint signing)"] += 1
    return {
        "scope": {"run": run, "since": since, "until": until},
        "verification": None if verification is None else {
            "ok": verification.ok, "events": verification.events, "checkpoints": verification.checkpoints,
            "first_bad": verification.first_bad, "findings": [f.message for f in verification.findings[:10]]},
        "runs": sorted(runs.values(), key=lambda r: r["started"] or ""),
        "entities": {e: dict(c) for e, c in sorted(counts.items())},
        "rejects": {e: dict(r) for e, r in sorted(rejects.items())},
        "personal_data_fields": sorted(fields.values(), key=lambda f: (f["entity"], f["field"])),
        "key_usage": dict(sorted(keys.items())),
        "erasures": erasures,
    }


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False)


def to_csv(report: dict[str, Any]) -> str:
    """One flat table: section, subject of the row, metric, value."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["section", "item", "metric", "value"])
    verification = report["verification"]
    if verification:
        writer.writerow(["verification", "chain", "ok", verification["ok"]])
        writer.writerow(["verification", "chain", "events", verification["events"]])
    for run in report["runs"]:
        for key in ("mapping", "mapping_sha256", "actor", "started", "finished", "outcome", "purpose", "lawful_basis"):
            writer.writerow(["run", run["run_id"], key, run[key] if run[key] is not None else ""])
    for entity, counts in report["entities"].items():
        for action, n in counts.items():
            writer.writerow(["records", entity, action, n])
    for entity, reasons in report["rejects"].items():
        for reason, n in reasons.items():
            writer.writerow(["rejects", entity, reason, n])
    for field in report["personal_data_fields"]:
        writer.writerow(["personal_data", f"{field['entity']}.{field['field']}", field["category"],
                         field["protection"]])
    for key, n in report["key_usage"].items():
        writer.writerow(["key_usage", key, "uses", n])
    for erasure in report["erasures"]:
        writer.writerow(["erasure", erasure["seq"], erasure["time"], erasure.get("outcome") or ""])
    return out.getvalue()




def to_html(report: dict[str, Any]) -> str:
    """Self-contained: inline CSS, no scripts, no external resources; every value HTML-escaped."""
    environment = Environment(loader=PackageLoader("crmbridge.audit", "templates"),
                              autoescape=select_autoescape(default=True, default_for_string=True))
    return environment.get_template("report.html.j2").render(**report)
