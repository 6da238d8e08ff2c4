"""Dedupe one staged entity: match, write golden records over their survivors, drop absorbed rows from the
load, and keep lineage (`dedupe_lineage`) and the scored pairs (`dedupe_pairs`) in the staging store."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crmbridge.dedupe import review
from crmbridge.dedupe.matcher import REJECT, Matcher, MatchResult
from crmbridge.dedupe.partition import PARTS, RunJobs, matcher_pairs
from crmbridge.dedupe.survive import golden
from crmbridge.mappings.model import Entity, Mapping
from crmbridge.masking import key_mask, mask_value
from crmbridge.staging import QuarantineRecord, Staging, table_name

TABLES = """
CREATE TABLE IF NOT EXISTS dedupe_lineage (
    entity VARCHAR, row_no BIGINT, source_key VARCHAR, external_id VARCHAR, survivor_row BIGINT,
    survivor_key VARCHAR, survivor_external_id VARCHAR, score DOUBLE, rule VARCHAR
);
CREATE TABLE IF NOT EXISTS dedupe_pairs (
    entity VARCHAR, left_row BIGINT, right_row BIGINT, left_key VARCHAR, right_key VARCHAR, score DOUBLE,
    rule VARCHAR, outcome VARCHAR, field_scores JSON
);
"""


def review_path(mapping: Mapping, entity: Entity) -> Path:
    spec = entity.dedupe
    assert spec is not None
    if spec.review_file:
        path = Path(spec.review_file)
        return path if path.is_absolute() else mapping.base_dir / path
    return mapping.state_dir / "review" / f"{entity.name}.csv"


def dedupe_entity(staging: Staging, entity: Entity, review_path: Path, report_dir: Path | None = None,
                  existing: pd.DataFrame | None = None, run_jobs: RunJobs | None = None) -> dict[str, Any]:
    """Match the staged rows of `entity` and settle its clusters; once per staging (a resumed run skips it).

    `run_jobs`: candidates and comparisons are split by blocking key into jobs this runs (on workers), with
    the same result (crmbridge.dedupe.partition)."""
    spec = entity.dedupe
    assert spec is not None
    con = staging.con
    con.execute(TABLES)
    done = con.execute("SELECT count(*) FROM stages WHERE entity = ? AND stage = 'dedupe' AND status = 'done'",
                       [entity.name]).fetchone()[0]
    if done:
        return {"skipped": 1}
    frame = con.execute(f'SELECT * FROM "{table_name(entity)}" ORDER BY _seq').df()
    matcher = Matcher(spec)
    pair_finder = None if run_jobs is None else matcher_pairs(matcher, PARTS, run_jobs)
    decisions = review.read(review_path)
    target_matches = None
    if existing is not None and len(existing):
        result, target_matches = _match_with_target(matcher, frame, existing, decisions, pair_finder)
    else:
        result = matcher.run(frame, frame["_ext"].astype(str).tolist(), decisions, pairs=pair_finder)
    labels = result.labels
    n = len(frame)

    members = np.flatnonzero(np.bincount(labels, minlength=n)[labels] > 1) if n else np.zeros(0, dtype=int)
    fields = list(entity.fields)
    gold = golden(frame.iloc[members], labels[members], fields, spec) if len(members) else None
    lineage = _lineage(frame, result, members, spec)
    pairs = _pairs(frame, result, spec)

    con.begin()
    try:
        con.execute("DELETE FROM dedupe_lineage WHERE entity = ?", [entity.name])
        con.execute("DELETE FROM dedupe_pairs WHERE entity = ?", [entity.name])
        if len(lineage):
            con.register("lineage_frame", lineage)
            con.execute("INSERT INTO dedupe_lineage SELECT ?, * FROM lineage_frame", [entity.name])
            con.unregister("lineage_frame")
        if len(pairs):
            con.register("pairs_frame", pairs)
            con.execute("INSERT INTO dedupe_pairs SELECT ?, left_row, right_row, left_key, right_key, score, "
                        "rule, outcome, field_scores::JSON FROM pairs_frame", [entity.name])
            con.unregister("pairs_frame")
        con.execute(f'CREATE OR REPLACE TABLE "{members_table(entity)}" AS SELECT * FROM "{table_name(entity)}" '
                    "WHERE _row IN (SELECT row_no FROM dedupe_lineage WHERE entity = ?)", [entity.name])
        if gold is not None:
            _write_golden(staging, entity, frame, gold, fields)
        _record_target_matches(staging, entity, frame, target_matches)
        staging.mark(entity.name, "dedupe", "done")
        con.commit()
    except BaseException:
        con.rollback()
        raise
    _write_review(review_path, frame, result, matcher, entity, decisions)
    if report_dir is not None and len(lineage):
        write_report_files(merge_report_frame(con, entity), entity.name, report_dir)
    return result.stats


def _match_with_target(matcher: Matcher, frame: pd.DataFrame, existing: pd.DataFrame,
                       decisions: dict[tuple[str, str], str], pairs: Any = None) -> tuple[MatchResult, pd.DataFrame]:
    """Match the staged rows together with the target's rows (placed first, never paired together).

    Returns the result over the staged rows alone, and the staged survivors that take a target row's
    external id (row position, external id, score)."""
    m = len(existing)
    combined = pd.concat([existing, frame], ignore_index=True)
    ids = combined["_ext"].astype(str).tolist()
    full = matcher.run(combined, ids, decisions, frozen=m, pairs=pairs)
    labels = full.labels
    staged = labels[m:]
    # Staged survivor of every cluster: its first staged member (target rows are never loaded).
    first: dict[int, int] = {}
    for position, label in enumerate(staged.tolist()):
        first.setdefault(label, position)
    new_labels = np.array([first[label] for label in staged.tolist()], dtype=np.int64)
    pairs = (full.i >= m) & (full.j >= m)
    result = MatchResult(full.i[pairs] - m, full.j[pairs] - m, full.score[pairs], full.rule[pairs],
                         full.sims[pairs], new_labels, full.stats)
    best = {}
    to_target = (full.i < m) & (full.j >= m) & (labels[full.i] == labels[full.j])
    for a, b, score in zip(full.i[to_target].tolist(), full.j[to_target].tolist(),
                           full.score[to_target].tolist(), strict=True):
        survivor = first[int(labels[b])]
        if survivor not in best or score > best[survivor][1]:
            best[survivor] = (a, score)
    matches = pd.DataFrame({
        "position": list(best), "target_external_id": [existing["_ext"].iat[a] for a, _ in best.values()],
        "score": [score for _, score in best.values()]})
    result.stats["matched_target_rows"] = len(matches)
    return result, matches


def _record_target_matches(staging: Staging, entity: Entity, staged: pd.DataFrame,
                           matches: pd.DataFrame | None) -> None:
    """A survivor matching a target row is loaded under that row's external id (the load updates it)."""
    con = staging.con
    con.execute("CREATE TABLE IF NOT EXISTS dedupe_target_matches (entity VARCHAR, row_no BIGINT, "
                "source_key VARCHAR, own_external_id VARCHAR, target_external_id VARCHAR, score DOUBLE)")
    con.execute("DELETE FROM dedupe_target_matches WHERE entity = ?", [entity.name])
    if matches is None or not len(matches):
        return
    table = table_name(entity)
    chosen = staged.iloc[matches["position"].to_numpy()].reset_index(drop=True)
    frame = pd.DataFrame({"seq": chosen["_seq"], "row_no": chosen["_row"], "source_key": chosen["_key"],
                          "own": chosen["_ext"], "target": matches["target_external_id"].astype(str),
                          "score": matches["score"]})
    con.register("target_frame", frame)
    con.execute("INSERT INTO dedupe_target_matches SELECT ?, row_no, source_key, own, target, score "
                "FROM target_frame", [entity.name])
    con.execute(f'UPDATE "{table}" SET _ext = t.target FROM target_frame t WHERE "{table}"._seq = t.seq')
    con.execute("UPDATE dedupe_lineage SET survivor_external_id = t.target FROM target_frame t "
                "WHERE dedupe_lineage.entity = ? AND dedupe_lineage.survivor_row = t.row_no", [entity.name])
    con.unregister("target_frame")


def _lineage(frame: pd.DataFrame, result: MatchResult, members: np.ndarray, spec) -> pd.DataFrame:
    """One row per cluster member: its survivor, and the best link that put it there (score, rule)."""
    labels = result.labels
    matched = result.matched(spec)
    same = matched & (labels[result.i] == labels[result.j])
    best: dict[int, tuple[float, str]] = {}
    for a, b, s, r in zip(result.i[same].tolist(), result.j[same].tolist(), result.score[same].tolist(),
                          result.rule[same].tolist(), strict=True):
        link = (1.0 if r else s, r or "score")
        for row in (a, b):
            if row not in best or link[0] > best[row][0]:
                best[row] = link
    survivor = labels[members]
    is_survivor = survivor == members
    return pd.DataFrame({
        "row_no": frame["_row"].to_numpy()[members],
        "source_key": frame["_key"].to_numpy()[members],
        "external_id": frame["_ext"].to_numpy()[members],
        "survivor_row": frame["_row"].to_numpy()[survivor],
        "survivor_key": frame["_key"].to_numpy()[survivor],
        "survivor_external_id": frame["_ext"].to_numpy()[survivor],
        "score": [np.nan if s else best.get(m, (np.nan, ""))[0] for m, s in zip(members, is_survivor, strict=True)],
        "rule": ["survivor" if s else best.get(m, (np.nan, ""))[1] for m, s in zip(members, is_survivor, strict=True)],
    })


def _pairs(frame: pd.DataFrame, result: MatchResult, spec) -> pd.DataFrame:
    """Matched and reviewable pairs, with per-field scores, for `crmbridge dedupe explain`."""
    keep = result.matched(spec) | result.for_review(spec) | (result.rule == f"review:{REJECT}")
    i, j = result.i[keep], result.j[keep]
    labels = result.labels
    outcome = np.where(labels[i] == labels[j], "merged",
                       np.where(result.matched(spec)[keep], "kept_apart", "review"))
    outcome = np.where(result.rule[keep] == f"review:{REJECT}", "rejected", outcome)
    names = [c.field for c in spec.compare]
    scores = [json.dumps({n: (None if v != v else round(v, 4)) for n, v in zip(names, row, strict=True)})
              for row in result.sims[keep].tolist()]
    rows, keys = frame["_row"].to_numpy(), frame["_key"].to_numpy()
    return pd.DataFrame({"left_row": rows[i], "right_row": rows[j], "left_key": keys[i], "right_key": keys[j],
                         "score": result.score[keep], "rule": result.rule[keep], "outcome": outcome,
                         "field_scores": scores})


def _write_golden(staging: Staging, entity: Entity, frame: pd.DataFrame, gold: pd.DataFrame,
                  fields: list[str]) -> None:
    """Survivor rows take the golden values; absorbed rows leave the load (the ledger gets `merged`)."""
    table = table_name(entity)
    seqs = frame["_seq"].to_numpy()
    update = gold.copy()
    update.insert(0, "_seq", seqs[update.index.to_numpy()])
    update = update.reset_index(drop=True)
    staging.con.register("golden_frame", update)
    assignments = ", ".join(f'"{f}" = g."{f}"' for f in fields)
    staging.con.execute(f'UPDATE "{table}" SET {assignments} FROM golden_frame g WHERE "{table}"._seq = g._seq')
    staging.con.unregister("golden_frame")
    staging.con.execute(f"""DELETE FROM "{table}" WHERE _row IN (
        SELECT row_no FROM dedupe_lineage WHERE entity = ? AND row_no <> survivor_row)""", [entity.name])


def _write_review(path: Path, frame: pd.DataFrame, result: MatchResult, matcher: Matcher, entity: Entity,
                  decisions: dict[tuple[str, str], str]) -> None:
    spec = matcher.spec
    pending = np.flatnonzero(result.for_review(spec))
    ids, rows = frame["_ext"].astype(str).to_numpy(), frame["_row"].to_numpy()
    masks = {name: f.mask for name, f in entity.fields.items()}
    out: list[dict[str, object]] = []
    for k in pending.tolist():
        a, b = int(result.i[k]), int(result.j[k])
        row: dict[str, object] = {"left_id": ids[a], "right_id": ids[b], "left_row": rows[a],
                                  "right_row": rows[b], "score": round(float(result.score[k]), 4), "decision": ""}
        for f, c in enumerate(spec.compare):
            mask = masks.get(c.field, "full")
            row[f"{c.field}_left"] = mask_value(frame[c.field].iat[a], mask)
            row[f"{c.field}_right"] = mask_value(frame[c.field].iat[b], mask)
            sim = result.sims[k, f]
            row[f"{c.field}_score"] = "" if sim != sim else round(float(sim), 4)
        out.append(row)
    for (a, b), decision in sorted(decisions.items()):
        out.append({"left_id": a, "right_id": b, "decision": decision})
    if out or path.exists():
        review.write(path, out, [c.field for c in spec.compare])


def members_table(entity: Entity) -> str:
    return f"dedupe_members_{entity.name}"


def merge_report_frame(con, entity: Entity) -> pd.DataFrame:
    """Every cluster: its golden record, then each member's original values, masked as in previews."""
    fields = list(entity.fields)
    values = ", ".join(f'CAST(x."{f}" AS VARCHAR) AS "{f}"' for f in fields)
    frame = con.execute(f"""
        SELECT l.survivor_external_id AS cluster, 'member' AS record, l.row_no, l.source_key,
               l.rule, l.score, {values}
        FROM dedupe_lineage l JOIN "{members_table(entity)}" x ON x._row = l.row_no WHERE l.entity = ?
        UNION ALL
        SELECT x._ext, 'golden', x._row, x._key, NULL, NULL, {values}
        FROM "{table_name(entity)}" x
        WHERE x._row IN (SELECT survivor_row FROM dedupe_lineage WHERE entity = ?)
        ORDER BY cluster, record DESC, row_no""", [entity.name, entity.name]).df()
    key_policy = key_mask(entity)
    frame["source_key"] = [mask_value(k, key_policy) for k in frame["source_key"]]
    for name in fields:
        policy = entity.fields[name].mask
        frame[name] = [mask_value(v, policy) for v in frame[name]]
    return frame


def write_report_files(frame: pd.DataFrame, entity_name: str, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = directory / f"merge_report_{entity_name}.csv"
    html_path = directory / f"merge_report_{entity_name}.html"
    frame.to_csv(csv_path, index=False)
    table = frame.to_html(index=False, na_rep="", border=0, classes="merges")
    html_path.write_text(
        f"<!doctype html><meta charset='utf-8'><title>Merge report: {html.escape(entity_name)}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{padding:2px 8px;"
        "border-bottom:1px solid #ddd}</style>"
        f"<h1>Merge report: {html.escape(entity_name)}</h1><p>{frame['cluster'].nunique()} clusters, "
        f"{int((frame['record'] == 'member').sum())} member rows; values masked as in previews.</p>{table}",
        encoding="utf-8")
    return csv_path, html_path


def record_merges(staging: Staging, entity: Entity) -> tuple[list[str], list[str | None]]:
    """After the entity's load: every absorbed row enters the ledger as `merged`, pointing at its survivor's
    target key; one whose survivor never reached the target is quarantined instead (nothing lost)."""
    con = staging.con
    con.execute(TABLES)
    con.begin()
    try:
        orphans = con.execute("""
            SELECT l.row_no, l.source_key FROM dedupe_lineage l
            LEFT JOIN ledger s ON s.entity = l.entity AND s.row_no = l.survivor_row
            WHERE l.entity = ? AND l.row_no <> l.survivor_row AND s.row_no IS NULL
              AND l.row_no NOT IN (SELECT row_no FROM quarantine WHERE entity = ?)""",
                              [entity.name, entity.name]).fetchall()
        problem = [{"field": "", "code": "survivor_not_loaded",
                    "detail": "merged into a record that the target did not accept"}]
        staging.add_quarantine(entity, [QuarantineRecord(r, k, "dedupe", "survivor_not_loaded", problem)
                                        for r, k in orphans])
        merged = con.execute("""
            SELECT l.entity, l.row_no, l.source_key, s.external_id, s.target_key, 'merged', []::VARCHAR[], NULL
            FROM dedupe_lineage l JOIN ledger s ON s.entity = l.entity AND s.row_no = l.survivor_row
            WHERE l.entity = ? AND l.row_no <> l.survivor_row
              AND l.row_no NOT IN (SELECT row_no FROM ledger WHERE entity = ?)""",
                             [entity.name, entity.name]).df()
        if len(merged):
            con.register("merged_frame", merged)
            con.execute("INSERT INTO ledger SELECT * FROM merged_frame")
            con.unregister("merged_frame")
        con.commit()
    except BaseException:
        con.rollback()
        raise
    return merged["source_key"].tolist(), merged["target_key"].tolist()
