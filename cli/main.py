"""The `crmbridge` command."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from crmbridge import __version__
from crmbridge.cli.common import MappingArg, ProjectOpt, StateOpt
from crmbridge.cli.common import fail as _fail
from crmbridge.cli.common import load as _load
from crmbridge.cli.common import state_dir as _state_dir
from crmbridge.cli.render import RichProgress, console, errors, reconciliation_table
from crmbridge.errors import CrmbridgeError
from crmbridge.runs import find_run, list_runs
from crmbridge.schemas import schema_text

app = typer.Typer(help="Move customer data between legacy systems, ERPs and CRMs with YAML mappings.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

DaskOpt = Annotated[str | None, typer.Option(
    "--dask", metavar="local[:N]|ADDRESS",
    help="Prepare batches (cleanse, validate, protect), write them and compare dedupe candidates on a Dask "
         "cluster: `local` starts one worker process per CPU (`local:N`: N), an address such as "
         "tcp://10.0.0.5:8786 uses a running cluster. Default: the mapping's `settings.dask`.")]






@app.command()
def version() -> None:
    """Print the crmbridge version."""
    console.print(__version__)


@app.command()
def schema() -> None:
    """Print the mapping JSON Schema (for editors and CI checks)."""
    sys.stdout.write(schema_text("mapping"))


@app.command()
def init(directory: Annotated[Path, typer.Argument(help="Directory to create.")]) -> None:
    """Scaffold a project: an example mapping, sample data, .env.example and the mapping schema."""
    if directory.exists() and any(directory.iterdir()):
        raise _fail(f"{directory} exists and is not empty", 2)
    templates = Path(__file__).parent / "templates"
    (directory / "data").mkdir(parents=True, exist_ok=True)
    shutil.copy(templates / "mapping.yaml", directory / "mapping.yaml")
    shutil.copy(templates / "customers.csv", directory / "data" / "customers.csv")
    shutil.copy(templates / "env.example", directory / ".env.example")
    shutil.copy(templates / "gitignore", directory / ".gitignore")
    (directory / "mapping.schema.json").write_text(schema_text("mapping"), encoding="utf-8")
    console.print(f"Created [bold]{directory}[/]:")
    for name in ("mapping.yaml", "mapping.schema.json", "data/customers.csv", ".env.example", ".gitignore"):
        console.print(f"  {directory / name}")
    console.print(f"Next: [bold]crmbridge validate {directory / 'mapping.yaml'}[/], then "
                  f"[bold]crmbridge run {directory / 'mapping.yaml'}[/]")


@app.command()
def validate(
    mapping_file: MappingArg,
    offline: Annotated[bool, typer.Option(help="Only check the file; do not connect to sources and targets.")] = False,
    check_target: Annotated[bool, typer.Option(
        "--check-target", help="Compare the mapping with each target's metadata (Salesforce: describe()); the "
        "default unless --offline.")] = False,
) -> None:
    """Check a mapping: JSON Schema, meaning, then (unless --offline) the real sources and targets."""
    if offline and check_target:
        raise _fail("--offline and --check-target contradict each other: checking a target connects to it", 2)
    mapping = _load(mapping_file)
    if not offline:
        from crmbridge.flows.inspect import check_systems

        problems = check_systems(mapping)
        if problems:
            for problem in problems:
                errors.print(f"[red]-[/] {problem}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)
    checked = "file" if offline else "file, sources and targets"
    console.print(f"[green]ok[/] {mapping_file}: {len(mapping.entities)} entities, {checked} checked")


@app.command()
def preview(
    mapping_file: MappingArg,
    limit: Annotated[int, typer.Option(help="Rows per entity.", min=1)] = 20,
    entity: Annotated[str | None, typer.Option(help="Only this entity.")] = None,
) -> None:
    """Show rows before and after cleansing, per entity (masked fields stay masked)."""
    from crmbridge.flows.inspect import preview_entity

    mapping = _load(mapping_file)
    chosen = [e for e in mapping.load_order() if entity in (None, e.name)]
    if not chosen:
        raise _fail(f"no entity `{entity}`; entities: {', '.join(e.name for e in mapping.entities)}", 2)
    for item in chosen:
        try:
            shown = preview_entity(mapping, item, limit)
        except CrmbridgeError as error:
            raise _fail(str(error)) from None
        console.rule(f"[bold]{item.name}[/]  ({item.source} → {item.target}.{item.target_table})")
        console.print(_frame_table("before (source)", shown.before))
        after = shown.after.copy()
        console.print(_frame_table("after (cleansed)", after))
        for row, reason in sorted({**shown.quarantined, **shown.rejected}.items()):
            console.print(f"  [yellow]row {row} → quarantine:[/] {reason}", highlight=False)


def _frame_table(title: str, frame) -> Table:
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        table.add_column(str(column), overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*("" if v is None else str(v) for v in row))
    return table


@app.command()
def run(
    mapping_file: MappingArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Do everything but write to the target.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's own log lines.")] = False,
    dask: DaskOpt = None,
) -> None:
    """Run the migration as a Prefect flow and print its reconciliation."""
    from crmbridge.flows.prefect_env import configure_prefect

    how = configure_prefect(verbose)
    mapping = _load(mapping_file)
    console.print(f"[dim]{how}[/]", highlight=False)
    from crmbridge.flows import migrate

    _with_progress(lambda: migrate.start_run(mapping.path, dry_run=dry_run, dask=dask), dry_run)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(help="The failed or killed run (a unique prefix is enough).")],
    project: ProjectOpt = Path("."),
    state_dir: StateOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's own log lines.")] = False,
    dask: DaskOpt = None,
) -> None:
    """Carry on a failed or killed run where it stopped: staged entities are not extracted again and
    loaded batches are not loaded again. The mapping file must be unchanged since the run started."""
    from crmbridge.flows.prefect_env import configure_prefect

    how = configure_prefect(verbose)
    try:
        item = find_run(_state_dir(project, state_dir), run_id)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    console.print(f"[dim]{how}[/]", highlight=False)
    from crmbridge.flows import migrate

    _with_progress(lambda: (item, migrate.resume_run(item, dask=dask)), item.manifest().dry_run)


def _with_progress(start, dry_run: bool) -> None:
    """Run `start()` (a run or a resume) under progress bars, then print its reconciliation."""
    from crmbridge.flows import progress

    started = time.perf_counter()
    with RichProgress() as bars:
        progress.install(bars)
        try:
            run_dir, result = start()
        except CrmbridgeError as error:
            bars.bars.stop()
            raise _fail(str(error)) from None
        finally:
            progress.install(None)
    console.print(reconciliation_table(result, dry_run))
    waited = f" (first rows moved after {bars.first_rows_at - started:.1f}s)" if bars.first_rows_at else ""
    console.print(f"run [bold]{run_dir.run_id}[/] finished in {time.perf_counter() - started:.1f}s{waited}; "
                  f"details: {run_dir.path}")




@app.command()
def runs(project: ProjectOpt = Path("."), state_dir: StateOpt = None) -> None:
    """List past runs, newest last."""
    table = Table(title="Runs", title_justify="left")
    for column in ("run", "mapping", "status", "dry run", "started", "finished", "source rows", "quarantined"):
        table.add_column(column)
    for item in list_runs(_state_dir(project, state_dir)):
        manifest = item.manifest()
        rec = item.reconciliation() or {"entities": []}
        source = sum(e["source"] for e in rec["entities"])
        quarantined = sum(e["quarantined"] for e in rec["entities"])
        colour = {"succeeded": "green", "failed": "red"}.get(manifest.status, "yellow")
        table.add_row(item.run_id, manifest.mapping_name, f"[{colour}]{manifest.status}[/]",
                      "yes" if manifest.dry_run else "", manifest.started_at[:19], (manifest.finished_at or "")[:19],
                      str(source), str(quarantined))
    console.print(table)


@app.command()
def report(
    run_id: Annotated[str, typer.Argument(help="Run id (a unique prefix is enough).")],
    project: ProjectOpt = Path("."),
    state_dir: StateOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reconciliation as JSON.")] = False,
) -> None:
    """Print a run's reconciliation."""
    try:
        item = find_run(_state_dir(project, state_dir), run_id)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    manifest = item.manifest()
    rec = item.reconciliation()
    if as_json:
        sys.stdout.write(json.dumps({"manifest": manifest.__dict__, "reconciliation": rec}, indent=2) + "\n")
        return
    console.print(f"run [bold]{item.run_id}[/] · mapping {manifest.mapping_name} "
                  f"(sha256 {manifest.mapping_sha256[:12]}) · {manifest.status}")
    if manifest.error:
        console.print(f"[red]{manifest.error}[/]", highlight=False)
    if rec:
        console.print(reconciliation_table(rec, manifest.dry_run))
    else:
        console.print("no reconciliation (the run stopped before reconciling)")


from crmbridge.cli.profile_cmd import profile  # noqa: E402
from crmbridge.cli.quarantine_cmd import quarantine_app  # noqa: E402  (registered after the app exists)

app.add_typer(quarantine_app, name="quarantine")
app.command()(profile)


server_app = typer.Typer(help="A persistent local Prefect server, so runs start in under a second.",
                         no_args_is_help=True)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 4280) -> None:
    """Start the server in the background (its state lives in ~/.crmbridge, or $CRMBRIDGE_HOME)."""
    from crmbridge.flows.prefect_env import start_server

    try:
        info = start_server(port)
    except RuntimeError as error:
        raise _fail(str(error)) from None
    console.print(f"Prefect server running at {info.api_url} (pid {info.pid}); UI at "
                  f"http://127.0.0.1:{info.port}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the background server."""
    from crmbridge.flows.prefect_env import stop_server

    console.print("stopped" if stop_server() else "no server was started by crmbridge")


@server_app.command("status")
def server_status() -> None:
    """Say whether runs will use the persistent server."""
    from crmbridge.flows.prefect_env import running_server

    info = running_server()
    console.print(f"running at {info.api_url} (pid {info.pid})" if info else "not running")


from crmbridge.cli.keys_cmd import erase, keys_app  # noqa: E402  (the keyring of protected fields)

app.add_typer(keys_app, name="keys")
app.command()(erase)
from crmbridge.cli.rollback_cmd import rollback  # noqa: E402  (undo a run in its targets)

app.command()(rollback)

from crmbridge.cli.sync_cmd import schedule, sync  # noqa: E402  (incremental ERP -> CRM sync)

app.command()(sync)
app.command()(schedule)

from crmbridge.cli.dedupe_cmd import dedupe_app  # noqa: E402  (explain merges, merge report)

app.add_typer(dedupe_app, name="dedupe")

from crmbridge.cli.audit_cmd import audit_app  # noqa: E402  (the compliance audit trail)

app.add_typer(audit_app, name="audit")

from crmbridge.cli.sandbox_cmd import sandbox_app  # noqa: E402  (local emulators: `sandbox salesforce`)

app.add_typer(sandbox_app, name="sandbox")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
