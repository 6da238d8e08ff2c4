"""Quarantine export and retry: the consultant's loop for rejected rows.

Export writes one CSV line per quarantined row: `_entity`, `_row` (source row number), `_key`, `_stage`,
`_rule` (the reason code), the first problem's `_field`, `_message` and `_value`, every problem in
`_problems`, then the row's source columns as the source holds them now (read again by row number), so
the consultant fixes the values in place. Values of masked or protected fields are written masked; a
masked cell left as it is means "keep the source's value".

Retry feeds the fixed rows back through the same mapping *into the original run*: for each entity, in
load order, the rows' old quarantine entries and staged copies are replaced by the fixed rows, staged
with their original row numbers and keys (zero new source rows), checked again (whole-entity rules
included), then loaded. The run's reconciliation therefore moves each fixed row from `quarantined` to
`created` / `updated` (or keeps it quarantined with its new reasons) and still balances against the
original source count; every retry is listed in the run's `retries.json`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crmbridge.errors import CrmbridgeError
from crmbridge.flows import steps
from crmbridge.flows.reconcile import unbalanced_message
from crmbridge.mappings import load_mapping
from crmbridge.mappings.cleanse import cleanse, shown_as
from crmbridge.mappings.model import Entity, Mapping
from crmbridge.masking import HIDDEN, key_mask, mask_value
from crmbridge.runs import RunDir
from crmbridge.staging import QuarantineRecord, Staging, table_name

log = logging.getLogger("crmbridge.run")

META = ["_entity", "_row", "_key", "_stage", "_rule", "_field", "_message", "_value", "_problems"]
_ORDER = ["none", "last4", "email", "full"]


def column_policies(entity: Entity) -> dict[str, str]:
    """How each source column is shown: the strictest way a field reading it as its `from` is shown (or, for
    a column only steps read, the strictest reading field); key columns as the key is shown."""
    own: dict[str, str] = {}  # columns that are some field's `from`: those fields decide
    aux: dict[str, str] = {}  # columns only a step reads (coalesce, region_from): the reading field decides
    for spec in entity.fields.values():
        if spec.source_column:
            own[spec.source_column] = max(own.get(spec.source_column, "none"), shown_as(spec), key=_ORDER.index)
        for column in (c for step in spec.transforms for c in step.columns):
            aux[column] = max(aux.get(column, "none"), shown_as(spec), key=_ORDER.index)
    policies = {**aux, **own}
    for column in entity.key:
        policies[column] = max(policies.get(column, "none"), key_mask(entity), key=_ORDER.index)
    return policies


def read_source_rows(mapping: Mapping, entity: Entity, rows: set[int]) -> dict[int, dict[str, Any]]:
    """The source's current values of the given row numbers (one pass over the source)."""
    found: dict[int, dict[str, Any]] = {}
    if not rows:
        return found
    from crmbridge.connectors import connector_for

    source = connector_for(mapping.sources[entity.source], mapping).open_source(entity)
    try:
        for batch in source.read(entity.source_columns, mapping.batch_size):
            wanted = np.isin(batch.row_numbers, list(rows))
            if not wanted.any():
                continue
            frame = batch.frame.reset_index(drop=True)
            for position in np.flatnonzero(wanted):
                found[int(batch.row_numbers[position])] = frame.iloc[int(position)].to_dict()
    finally:
        source.close()
    return found


def _cell(value: Any) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def export_rows(run: RunDir, entity_name: str | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """The export's header and lines (see the module docstring)."""
    staging = Staging(run.staging_path)
    try:
        frame = staging.quarantine_frame(entity_name)
    finally:
        staging.close()
    try:
        mapping: Mapping | None = load_mapping(run.manifest().mapping_path)
    except CrmbridgeError:
        mapping = None  # the mapping is gone: every value stays hidden, and no source columns
    header = list(META)
    lines: list[dict[str, str]] = []
    for name, group in frame.groupby("entity", sort=False):
        entity = _entity(mapping, str(name))
        policies = column_policies(entity) if entity else {}
        sources = read_source_rows(mapping, entity, set(group.row_no.tolist())) if mapping and entity else {}
        columns = entity.source_columns if entity else []
        header += [c for c in columns if c not in header]
        key_policy = key_mask(entity) if entity else "full"
        for row in group.itertuples(index=False):
            problems = json.loads(row.problems)
            first = problems[0] if problems else {}
            line = {"_entity": str(name), "_row": str(row.row_no), "_key": mask_value(row.source_key, key_policy),
                    "_stage": row.stage, "_rule": row.reason, "_field": first.get("field", ""),
                    "_message": first.get("detail", ""),
                    "_value": first.get("value", "") if entity else HIDDEN if first.get("value") else "",
                    "_problems": "; ".join(f"{p['field']}: {p['code']} ({p['detail']})" for p in problems)}
            values = sources.get(int(row.row_no), {})
            for column in columns:
                line[column] = mask_value(_cell(values.get(column)), policies.get(column, "none")) \
                    if _cell(values.get(column)) else ""
            lines.append(line)
    return header, lines


def write_export(run: RunDir, output: Any, entity_name: str | None = None) -> int:
    header, lines = export_rows(run, entity_name)
    writer = csv.DictWriter(output, fieldnames=header, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(lines)
    return len(lines)


def _entity(mapping: Mapping | None, name: str) -> Entity | None:
    if mapping is None:
        return None
    try:
        return mapping.entity(name)
    except KeyError:
        return None


# --- retry -----------------------------------------------------------------------------------------------


@dataclass
class RetryResult:
    entities: dict[str, dict[str, int]] = field(default_factory=dict)  # entity -> retried, loaded, quarantined
    reconciliation: dict[str, Any] = field(default_factory=dict)


def read_fixed(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise CrmbridgeError(f"{path}: cannot read the fixed rows ({type(error).__name__}: "
                             f"{getattr(error, 'strerror', None) or 'expected a UTF-8 CSV'})") from None
    missing = [c for c in ("_entity", "_row") if c not in frame.columns]
    if missing:
        raise CrmbridgeError(f"{path}: expected the columns of `crmbridge quarantine export` (_entity, _row, then "
                             f"the source columns); missing: {', '.join(missing)}")
    bad = [i + 2 for i, v in enumerate(frame["_row"]) if not v.strip().isdigit()]
    if bad:
        raise CrmbridgeError(f"{path}:{bad[0]}: column `_row`: expected the source row number of the export")
    return frame


def retry(run: RunDir, fixed: Path, accept_changed_mapping: bool = False) -> RetryResult:
    """Feed the fixed rows of `fixed` back into `run` (see the module docstring)."""
    manifest = run.manifest()
    if manifest.dry_run:
        raise CrmbridgeError(f"run {run.run_id} was a dry run: nothing was loaded, so there is nothing to retry "
                             "into; fix the source and run again")
    if manifest.status != "succeeded":
        raise CrmbridgeError(f"run {run.run_id} is {manifest.status}; only a finished run can take retries "
                             "(resume or rerun it first)")
    mapping = load_mapping(manifest.mapping_path)
    if mapping.sha256 != manifest.mapping_sha256 and not accept_changed_mapping:
        raise CrmbridgeError(f"the mapping {manifest.mapping_path} changed since run {run.run_id}; the fixed rows "
                             "would not go through the same mapping (pass --accept-changed-mapping to use it "
                             "as it is now)")
    rows = read_fixed(fixed)
    names = {e.name for e in mapping.entities}
    unknown = sorted(set(rows["_entity"]) - names)
    if unknown:
        raise CrmbridgeError(f"{fixed}: unknown entity `{unknown[0]}` in `_entity`; expected one of: "
                             f"{', '.join(sorted(names))}")
    from crmbridge.audit.project import open_trail
    from crmbridge.flows.progress import NoProgress

    staging = Staging(run.staging_path)
    audit = open_trail(mapping, run.run_id, manifest.operator)
    ctx = steps.RunContext(mapping, run, staging, audit, False, NoProgress(), None)
    result = RetryResult()
    handler = logging.FileHandler(run.log_path, encoding="utf-8")  # the run's log: counts and names only
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("crmbridge").addHandler(handler)
    try:
        for entity in mapping.load_order():
            mine = rows[rows["_entity"] == entity.name]
            if len(mine):
                result.entities[entity.name] = _retry_entity(ctx, entity, mine, fixed)
        outcome = steps.reconcile(ctx)
        result.reconciliation = {"run_id": run.run_id, "dry_run": False, "entities": [r.as_dict() for r in outcome]}
        run.write_reconciliation(result.reconciliation)
        _note_retry(run, fixed, result)
        problem = unbalanced_message(outcome)
        if problem:
            raise CrmbridgeError(problem)
    finally:
        logging.getLogger("crmbridge").removeHandler(handler)
        handler.close()
        ctx.close()
        staging.close()
    return result


def _retry_entity(ctx: steps.RunContext, entity: Entity, rows: pd.DataFrame, fixed: Path) -> dict[str, int]:
    staging = ctx.staging
    row_numbers = rows["_row"].astype(int).to_numpy()
    quarantined = set(staging.con.execute("SELECT row_no FROM quarantine WHERE entity = ?",
                                          [entity.name]).df()["row_no"].tolist())
    strangers = [int(r) for r in row_numbers if int(r) not in quarantined]
    if strangers:
        raise CrmbridgeError(f"{fixed}: entity `{entity.name}` row {strangers[0]} is not in the quarantine of run "
                             f"{ctx.run.run_id} (only quarantined rows can be retried)")
    missing = [c for c in entity.source_columns if c not in rows.columns]
    if missing:
        raise CrmbridgeError(f"{fixed}: entity `{entity.name}` needs the source column(s) {', '.join(missing)}")
    frame = rows[entity.source_columns].reset_index(drop=True).astype(object)
    frame = frame.where(frame != "", None)
    kept = frame.apply(lambda column: column.map(lambda v: isinstance(v, str) and HIDDEN in v))
    if kept.to_numpy().any():  # masked cells left as exported: the source's value stands
        wanted = {int(row_numbers[i]) for i in np.flatnonzero(kept.to_numpy().any(axis=1))}
        originals = read_source_rows(ctx.mapping, entity, wanted)
        for position, column in zip(*np.nonzero(kept.to_numpy()), strict=True):
            row_no = int(row_numbers[position])
            if row_no not in originals:
                raise CrmbridgeError(f"{fixed}: entity `{entity.name}` row {row_no}, column "
                                     f"`{entity.source_columns[column]}` is still masked and the source no longer "
                                     "has that row; write the full value")
            frame.iat[position, column] = originals[row_no].get(entity.source_columns[column])
    cleansed = cleanse(ctx.mapping, entity, frame, row_numbers)
    records = [QuarantineRecord(row, cleansed.keys.get(row), "validate", found[0].code,
                                [p.as_dict() for p in found]) for row, found in cleansed.quarantined.items()]
    staged = steps.protect(entity, cleansed.frame, ctx.mapping)
    first_seq = staging.max_seq(entity) + 1
    staged.insert(0, "_seq", range(first_seq, first_seq + len(staged)))
    table = table_name(entity)
    numbers = pd.DataFrame({"row_no": row_numbers.astype(np.int64)})
    staging.con.begin()
    try:  # one transaction: a row is quarantined or staged, never neither nor both
        staging.con.register("retried_rows", numbers)
        staging.con.execute("DELETE FROM quarantine WHERE entity = ? AND row_no IN (SELECT row_no FROM retried_rows)",
                            [entity.name])
        staging.con.execute(f'DELETE FROM "{table}" WHERE _row IN (SELECT row_no FROM retried_rows)')
        staging.con.unregister("retried_rows")
        if len(staged):
            staging.con.register("retry_frame", staged)
            staging.con.execute(f'INSERT INTO "{table}" SELECT * FROM retry_frame')
            staging.con.unregister("retry_frame")
        staging.add_quarantine(entity, records)
        staging.con.commit()
    except BaseException:
        staging.con.rollback()
        raise
    steps.after_staging(ctx, entity)
    ctx.target(entity.target).prepare(entity, False)
    last_seq = staging.max_seq(entity)
    loaded = 0
    for start in range(first_seq, last_seq + 1, ctx.mapping.batch_size):
        counts = steps.load_batch(ctx, entity, start, min(start + ctx.mapping.batch_size - 1, last_seq))
        loaded += counts["created"] + counts["updated"] + counts["unchanged"]
    still = staging.con.execute("SELECT count(*) FROM quarantine WHERE entity = ? AND row_no IN "
                                f"({', '.join(str(int(r)) for r in row_numbers)})", [entity.name]).fetchone()[0]
    log.info("entity %s: retried %d quarantined rows: %d loaded, %d still quarantined", entity.name,
             len(row_numbers), loaded, still)
    return {"retried": len(row_numbers), "loaded": loaded, "quarantined": int(still)}


def _note_retry(run: RunDir, fixed: Path, result: RetryResult) -> None:
    path = run.path / "retries.json"
    history = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    history.append({"at": datetime.now(UTC).isoformat(), "file": str(fixed),
                    "file_sha256": hashlib.sha256(fixed.read_bytes()).hexdigest(), "entities": result.entities})
    path.write_text(json.dumps(history, indent=2), encoding="utf-8")
