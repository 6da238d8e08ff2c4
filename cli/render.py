"""Rich rendering shared by the commands: reconciliation tables, run lists, progress bars."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from crmbridge.flows.reconcile import BUCKETS

# Piped output (CI logs, files) gets a width that fits the reconciliation table instead of 80 columns.
console = Console(width=None if sys.stdout.isatty() else 120)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def reconciliation_table(data: dict[str, Any], dry_run: bool = False) -> Table:
    title = "Plan (dry run: nothing was written)" if dry_run else "Reconciliation"
    table = Table(title=title, title_justify="left")
    table.add_column("entity")
    table.add_column("source", justify="right")
    labels = {"created": "would create", "updated": "would update", "unchanged": "unchanged",
              "merged": "would merge", "quarantined": "quarantine"} if dry_run else {b: b for b in BUCKETS}
    for bucket in BUCKETS:
        table.add_column(labels[bucket], justify="right")
    table.add_column("balanced", justify="center")
    for row in data["entities"]:
        ok = "[green]yes[/]" if row["balanced"] else "[red]NO[/]"
        table.add_row(row["entity"], str(row["source"]), *(str(row[b]) for b in BUCKETS), ok)
    usage = data.get("api_usage") or {}
    if usage:  # e.g. Salesforce: calls this run made, and the org's daily quota from Sforce-Limit-Info
        table.caption = "API usage: " + "; ".join(
            f"{name} {u.get('calls', 0)} calls" + (f", {u['retries']} retried" if u.get("retries") else "")
            + (f", org {u['org_api_used']}/{u['org_api_limit']} today" if u.get("org_api_limit") else "")
            for name, u in usage.items())
    return table


class RichProgress:
    """One bar per entity and stage; extraction has no known total, loading does."""

    def __init__(self) -> None:
        self.bars = Progress(SpinnerColumn(), TextColumn("{task.description:<28}"), BarColumn(),
                             MofNCompleteColumn(), TextColumn("rows"), TimeElapsedColumn(), console=console)
        self.tasks: dict[tuple[str, str], Any] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.first_rows_at: float | None = None  # perf_counter() when the first batch was staged

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def stage(self, entity: str, stage: str, total: int | None = None) -> None:
        self.tasks[(entity, stage)] = self.bars.add_task(f"{entity} · {stage}", total=total)

    def advance(self, entity: str, stage: str, rows: int) -> None:
        if (entity, stage) not in self.tasks:
            self.stage(entity, stage)
        if self.first_rows_at is None:
            self.first_rows_at = time.perf_counter()
        self.counts[(entity, stage)] = self.counts.get((entity, stage), 0) + rows
        self.bars.advance(self.tasks[(entity, stage)], rows)

    def done(self, entity: str, stage: str) -> None:
        task = self.tasks.get((entity, stage))
        if task is not None:
            done = self.counts.get((entity, stage), 0)
            self.bars.update(task, total=done, completed=done)
