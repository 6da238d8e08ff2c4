"""`crmbridge sync` (one incremental cycle) and `crmbridge schedule` (serve it as a Prefect deployment)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from crmbridge.cli.common import fail as _fail
from crmbridge.cli.common import load as _load
from crmbridge.cli.render import console
from crmbridge.errors import CrmbridgeError

SYNC_FLOW = "crmbridge-sync"
WebhookOpt = Annotated[str | None, typer.Option(
    "--webhook", envvar="CRMBRIDGE_SYNC_WEBHOOK",
    help="URL that receives a JSON POST when a cycle fails (or set CRMBRIDGE_SYNC_WEBHOOK).")]






def sync(
    mapping_file: Annotated[Path, typer.Argument(help="The mapping file (YAML).", show_default=False)],
    webhook: WebhookOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's own log lines.")] = False,
) -> None:
    """Run one incremental sync cycle: the changes since the stored watermark, cleansed, validated and
    upserted, deletes and conflicts by policy; the watermark moves only after a successful load."""
    from crmbridge.flows.prefect_env import configure_prefect

    how = configure_prefect(verbose)
    mapping = _load(mapping_file)
    console.print(f"[dim]{how}[/]", highlight=False)
    from crmbridge.flows.sync import start_sync

    try:
        result = start_sync(mapping.path, webhook)
    except CrmbridgeError as error:
        raise _fail(str(error)) from None
    table = Table(title=f"sync {result['run_id']}")
    columns = ("entity", "read", "created", "updated", "unchanged", "quarantined", "deleted", "conflicts_kept",
               "watermark")
    for column in columns:
        table.add_column(column, justify="left" if column in ("entity", "watermark") else "right")
    for entity in result["entities"]:
        table.add_row(*(str(entity.get(c) if entity.get(c) is not None else "-") for c in columns))
    console.print(table)


def schedule(
    mapping_file: Annotated[str, typer.Argument(
        help="The mapping file to serve on a schedule, or `list` to show the schedules and their last runs.",
        show_default=False)],
    cron: Annotated[str | None, typer.Option("--cron", help='Cron schedule, e.g. "*/15 * * * *".')] = None,
    retries: Annotated[int, typer.Option(help="Retries of a failed cycle.", min=0)] = 2,
    retry_delay: Annotated[int, typer.Option(help="Seconds between retries.", min=0)] = 60,
    webhook: WebhookOpt = None,
    name: Annotated[str | None, typer.Option(help="Deployment name (default: <mapping name>-sync).")] = None,
) -> None:
    """Serve the sync as a Prefect deployment on a cron schedule (runs until stopped), or `list` them.

    Needs a Prefect API: `crmbridge server start` (local) or PREFECT_API_URL (a team's server)."""
    from crmbridge.flows.prefect_env import configure_prefect

    how = configure_prefect()
    deployment = None
    if mapping_file != "list":
        if not cron:
            raise _fail('expected --cron, e.g. --cron "*/15 * * * *"')
        mapping = _load(Path(mapping_file))
        try:
            deployment = build_deployment(mapping.path, mapping.name, cron, retries, retry_delay, webhook, name)
        except ValueError as error:
            raise _fail(f"--cron: {error}") from None
    if "temporary" in how:
        raise _fail("schedules need a Prefect server that outlives this command: run `crmbridge server start` "
                    "or set PREFECT_API_URL")
    if deployment is None:
        _list_schedules()
        return
    from prefect import serve

    console.print(f"[dim]{how}[/]\nserving [bold]{deployment.name}[/] ({cron}); Ctrl+C stops it", highlight=False)
    serve(deployment, print_starting_message=False)


def build_deployment(mapping_path: Path, mapping_name: str, cron: str, retries: int, retry_delay: int,
                     webhook: str | None, name: str | None = None) -> Any:
    """The Prefect deployment of the sync flow for one mapping (cron checked here, retries on the flow)."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.runner import EntrypointType
    from pydantic import ValidationError

    from crmbridge.flows.sync import RETRIES_ENV, RETRY_DELAY_ENV, sync_flow

    try:
        CronSchedule(cron=cron)  # Prefect's own check, so what passes here the server accepts
    except ValidationError:
        raise ValueError(f"`{cron}` is not a cron expression (expected five fields, e.g. */15 * * * *)") from None
    # Each run starts a process that imports the flow by module path; the retry policy reaches it through the
    # environment of this serving process (a served deployment takes no job variables).
    policy = {RETRIES_ENV: str(retries), RETRY_DELAY_ENV: str(retry_delay)}
    os.environ.update(policy)
    flow = sync_flow.with_options(retries=retries, retry_delay_seconds=retry_delay)
    return flow.to_deployment(
        name=name or f"{mapping_name}-sync", cron=cron, entrypoint_type=EntrypointType.MODULE_PATH,
        concurrency_limit=1,  # a cycle still running when the next is due: the next waits (see cycle_lock)
        parameters={"mapping_path": str(mapping_path), "webhook": webhook},
        tags=["crmbridge", "sync"], description=f"crmbridge sync of {mapping_path}",
    )


def schedules() -> list[dict[str, Any]]:
    """Every deployment of the sync flow with its schedules and its most recent run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import DeploymentSort, FlowRunSort

    found = []
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[SYNC_FLOW])),
                                              sort=DeploymentSort.NAME_ASC, limit=200)
        for deployment in deployments:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                sort=FlowRunSort.START_TIME_DESC, limit=1)
            last = runs[0] if runs else None
            found.append({
                "name": deployment.name,
                "schedules": [getattr(s.schedule, "cron", None) or str(s.schedule) for s in deployment.schedules],
                "mapping": (deployment.parameters or {}).get("mapping_path"),
                "last_run": last.name if last else None,
                "last_state": last.state.name if last and last.state else None,
                "last_start": last.start_time.isoformat() if last and last.start_time else None,
            })
    return found


def _list_schedules() -> None:
    rows = schedules()
    if not rows:
        console.print("no sync schedules (create one with `crmbridge schedule mapping.yaml --cron ...`)")
        return
    table = Table(title="sync schedules")
    for column in ("deployment", "schedule", "mapping", "last run", "state", "started"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], ", ".join(row["schedules"]) or "-", row["mapping"] or "-",
                      row["last_run"] or "-", row["last_state"] or "-", row["last_start"] or "-")
    console.print(table)
