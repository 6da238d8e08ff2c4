"""`crmbridge rollback RUN_ID [--dry-run] [--force]`: undo what a run wrote in its targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from crmbridge.cli.common import ProjectOpt, StateOpt
from crmbridge.cli.render import console, errors
from crmbridge.errors import CrmbridgeError
from crmbridge.runs import find_run

_COLUMNS = {"deleted": "delete", "restored": "restore", "recreated": "re-create", "already_undone": "already undone",
            "skipped": "skipped", "refused": "refused"}


def rollback(
    run_id: Annotated[str, typer.Argument(help="The run to roll back (a unique prefix is enough).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print what would be done.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Also undo records changed in the target since.")] = False,
    show: Annotated[int, typer.Option(help="Records listed per kind (0: counts only).", min=0)] = 20,
    project: ProjectOpt = Path("."),
    state_dir: StateOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's own log lines.")] = False,
) -> None:
    """Roll a run back: delete what it created, restore what it updated, re-create what it deleted.

    Children before parents, in batches; an interrupted rollback resumes where it stopped and a second one does
    nothing. Records changed in the target after the run are listed and left alone unless --force."""
    from crmbridge.flows import rollback as rb

    try:
        run = find_run(state_dir or project / ".crmbridge", run_id)
        if dry_run:
            report = rb.plan_rollback(run, force=force).as_dict()
        else:
            from crmbridge.flows.prefect_env import configure_prefect

            configure_prefect(verbose)
            report = rb.rollback_flow(run, force=force)
    except CrmbridgeError as error:
        errors.print(f"[red]error:[/] {error}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2, default=str) + "\n")
    else:
        _print(report, show)
    if not dry_run and not all(row["balanced"] for row in report["entities"]):
        raise typer.Exit(1)


def _print(report: dict, show: int) -> None:
    dry = report["dry_run"]
    title = ("Rollback plan (dry run: nothing was changed)" if dry else "Rollback reconciliation") + \
        (", --force" if report["force"] else "")
    table = Table(title=title, title_justify="left")
    table.add_column("entity")
    table.add_column("run wrote", justify="right")
    for outcome, label in _COLUMNS.items():
        table.add_column(f"would {label}" if dry and outcome in ("deleted", "restored", "recreated") else
                         label if dry else outcome.replace("_", " "), justify="right")
    table.add_column("balanced", justify="center")
    for row in report["entities"]:
        table.add_row(row["entity"], str(row["written"]), *(str(row[o]) for o in _COLUMNS),
                      "[green]yes[/]" if row["balanced"] else "[red]NO[/]")
    console.print(table)
    if dry and show:
        for entity, kinds in report.get("planned", {}).items():
            for kind, keys in kinds.items():
                more = f" … and {len(keys) - show} more" if len(keys) > show else ""
                console.print(f"would {_COLUMNS[kind]} {entity}: {', '.join(keys[:show])}{more}", highlight=False,
                              soft_wrap=True)
    for warning in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    conflicts = report["conflicts"]
    if conflicts:
        verb = "will be undone anyway (--force)" if report["force"] else "left alone (use --force to undo them)"
        console.print(f"[yellow]warning:[/] {len(conflicts)} records were changed in the target after the run; "
                      f"{verb}:", highlight=False)
        for c in conflicts[:show or len(conflicts)]:
            fields = f" fields: {', '.join(c['fields'])}" if c["fields"] else ""
            console.print(f"  {c['entity']} {c['target_key']} ({c['external_id']}): {c['reason']}{fields}",
                          highlight=False)
        if show and len(conflicts) > show:
            console.print(f"  … and {len(conflicts) - show} more (--json lists them all)")
    for refused in report.get("refused", [])[:show or None]:
        console.print(f"[red]refused:[/] {refused['entity']} {refused['external_id']}: {refused['detail']}",
                      highlight=False)
    if not dry:
        done = report.get("this_attempt", {})
        writes = sum(done.get(o, 0) for o in ("deleted", "restored", "recreated"))
        console.print(f"run {report['run_id']}: {writes} records undone now" if writes or done.get("skipped")
                      else f"run {report['run_id']}: nothing left to roll back")
