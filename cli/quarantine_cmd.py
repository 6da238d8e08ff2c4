"""`crmbridge quarantine export RUN_ID` and `crmbridge quarantine retry RUN_ID fixed.csv`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from crmbridge.cli.common import ProjectOpt, StateOpt
from crmbridge.cli.common import fail as _fail
from crmbridge.cli.render import console, errors, reconciliation_table
from crmbridge.errors import CrmbridgeError, MappingError
from crmbridge.runs import RunDir, find_run

quarantine_app = typer.Typer(help="Export a run's quarantined rows for fixing, and feed the fixed rows back.",
                             no_args_is_help=True)

RunArg = Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).", show_default=False)]




def _run(run_id: str, project: Path, state_dir: Path | None) -> RunDir:
    try:
        return find_run(state_dir or project / ".crmbridge", run_id)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None


@quarantine_app.command("export")
def export(
    run_id: RunArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="CSV file (default: standard output).")] = None,
    entity: Annotated[str | None, typer.Option(help="Only this entity.")] = None,
    project: ProjectOpt = Path("."),
    state_dir: StateOpt = None,
) -> None:
    """Write a run's quarantined rows as CSV for a consultant to fix.

    Per row: entity, source row number, source key, stage, rule, field, message and value of the first
    problem, all problems, then the row's source columns. Masked and protected fields stay masked (a
    masked cell left as it is keeps the source's value on retry); without a readable mapping every value
    and key is hidden."""
    from crmbridge.flows.quarantine import write_export

    item = _run(run_id, project, state_dir)
    try:
        if output:
            with output.open("w", encoding="utf-8", newline="") as handle:
                count = write_export(item, handle, entity)
            console.print(f"{count} quarantined rows written to {output}")
        else:
            write_export(item, sys.stdout, entity)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None


@quarantine_app.command("retry")
def retry(
    run_id: RunArg,
    fixed: Annotated[Path, typer.Argument(help="The exported CSV, with the values fixed.", show_default=False)],
    accept_changed_mapping: Annotated[bool, typer.Option(
        "--accept-changed-mapping", help="Use the mapping as it is now, even if it changed since the run.")] = False,
    project: ProjectOpt = Path("."),
    state_dir: StateOpt = None,
) -> None:
    """Feed fixed rows back through the run's mapping; the run's reconciliation moves them from
    quarantined to loaded (rows that still fail stay quarantined with their new reasons)."""
    from crmbridge.flows.quarantine import retry as retry_rows

    item = _run(run_id, project, state_dir)
    try:
        result = retry_rows(item, fixed, accept_changed_mapping)
    except MappingError as error:
        errors.print(f"[red]{error}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    for name, counts in result.entities.items():
        console.print(f"{name}: {counts['retried']} rows retried, {counts['loaded']} loaded, "
                      f"{counts['quarantined']} still quarantined", highlight=False)
    console.print(reconciliation_table(result.reconciliation, False))
