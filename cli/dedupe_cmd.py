"""`crmbridge dedupe explain` (why records were merged) and `crmbridge dedupe report` (the merge report)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import duckdb
import typer
from rich.table import Table

from crmbridge.cli.common import ProjectOpt, StateOpt
from crmbridge.cli.common import fail as _fail
from crmbridge.cli.render import console
from crmbridge.errors import CrmbridgeError
from crmbridge.mappings import load_mapping
from crmbridge.masking import key_mask, mask_value
from crmbridge.runs import find_run

dedupe_app = typer.Typer(help="Explain and report a run's deduplication.", no_args_is_help=True)

EntityOpt = Annotated[str | None, typer.Option(help="Entity (needed when several are deduplicated).")]




def _open(run_id: str, project: Path, state_dir: Path | None):
    try:
        item = find_run(state_dir or project / ".crmbridge", run_id)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    con = duckdb.connect(str(item.staging_path), read_only=True)
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'dedupe_lineage'").fetchone()[0]:
        con.close()
        raise _fail(f"run `{item.run_id}` deduplicated nothing (no entity has a `dedupe:` block)")
    try:
        masks = {e.name: key_mask(e) for e in load_mapping(item.manifest().mapping_path).entities}
    except CrmbridgeError:
        masks = {}
    return item, con, masks


@dedupe_app.command("explain")
def explain(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    key: Annotated[str, typer.Argument(help="Source key of a record.")],
    entity: EntityOpt = None,
    project: ProjectOpt = Path("."),
    state_dir: StateOpt = None,
) -> None:
    """Why a record was merged (or not): its cluster, and every scored pair it is in, with per-field
    scores and the rule or decision that applied. Other records' keys are masked like previews."""
    item, con, masks = _open(run_id, project, state_dir)
    try:
        where, params = "WHERE source_key = ?", [key]
        if entity:
            where, params = where + " AND entity = ?", [key, entity]
        cluster = con.execute(f"SELECT entity, survivor_key, rule, score FROM dedupe_lineage {where}",
                              params).fetchall()
        pairs = con.execute(f"""
            SELECT entity, CASE WHEN left_key = ? THEN right_key ELSE left_key END, score, rule, outcome,
                   field_scores
            FROM dedupe_pairs WHERE (left_key = ? OR right_key = ?) {"AND entity = ?" if entity else ""}
            ORDER BY score DESC""", [key, key, key] + ([entity] if entity else [])).fetchall()
    finally:
        con.close()
    if not cluster and not pairs:
        raise _fail(f"run `{item.run_id}`: record `{key}` was compared with nothing above the review threshold "
                    "(it stands alone)")
    for name, survivor, rule, score in cluster:
        shown = mask_value(survivor, masks.get(name, "full"))
        if survivor == key:
            console.print(f"[bold]{name}[/]: this record survives; the golden record absorbs the rows below")
        else:
            console.print(f"[bold]{name}[/]: merged into `{shown}` by {rule}"
                          + (f" (score {score:.4f})" if score == score and score is not None else ""))
    fields = sorted({f for *_, scores in pairs for f in json.loads(scores)}, key=str)
    table = Table(title="Scored pairs", title_justify="left")
    for column in ("entity", "other record", "score", "rule", "outcome", *fields):
        table.add_column(column)
    for name, other, score, rule, outcome, scores in pairs:
        values = json.loads(scores)
        table.add_row(name, mask_value(other, masks.get(name, "full")), f"{score:.4f}", rule or "score",
                      outcome, *["—" if values.get(f) is None else f"{values[f]:.3f}" for f in fields])
    console.print(table)


@dedupe_app.command("report")
def report(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    entity: Annotated[str, typer.Argument(help="The deduplicated entity.")],
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where to write it.")] = Path("."),
    project: ProjectOpt = Path("."),
    state_dir: StateOpt = None,
) -> None:
    """Write the merge report (CSV and HTML): every cluster with its members side by side."""
    from crmbridge.dedupe.engine import merge_report_frame, write_report_files

    item, con, _ = _open(run_id, project, state_dir)
    try:
        mapping = load_mapping(item.manifest().mapping_path)
        frame = merge_report_frame(con, mapping.entity(entity))
    except (CrmbridgeError, KeyError) as error:
        raise _fail(f"cannot report entity `{entity}`: {error}") from None
    finally:
        con.close()
    csv_path, html_path = write_report_files(frame, entity, output_dir)
    console.print(f"{frame['cluster'].nunique() if len(frame) else 0} clusters written to {csv_path} and {html_path}")
