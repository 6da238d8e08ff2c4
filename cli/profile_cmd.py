"""`crmbridge profile MAPPING`: a data-quality profile of the sources, before and after cleansing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from crmbridge.cli.render import console, errors
from crmbridge.errors import CrmbridgeError, MappingError
from crmbridge.mappings import load_mapping


def profile(
    mapping_file: Annotated[Path, typer.Argument(help="The mapping file (YAML).", show_default=False)],
    entity: Annotated[str | None, typer.Option(help="Only this entity.")] = None,
    rows: Annotated[int, typer.Option(help="Source rows to profile per entity (0: all).", min=0)] = 100_000,
    html_file: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report.")] = None,
) -> None:
    """Profile the sources before and after cleansing: missing rate, distinct count, top values, patterns,
    and the rows each rule would refuse. Masked and protected values stay masked."""
    from crmbridge.flows.profile import profile_mapping, render_html

    try:
        mapping = load_mapping(mapping_file)
    except MappingError as error:
        errors.print(f"[red]{error}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    chosen = [e for e in mapping.load_order() if entity in (None, e.name)]
    if not chosen:
        errors.print(f"[red]error:[/] no entity `{entity}`; entities: {', '.join(e.name for e in mapping.entities)}")
        raise typer.Exit(2)
    try:
        profiles = profile_mapping(mapping, chosen, rows or None)
    except CrmbridgeError as error:
        errors.print(f"[red]error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    for item, found in zip(chosen, profiles, strict=True):
        share = found.quarantined_rows / max(found.rows, 1)
        console.rule(f"[bold]{item.name}[/]  {found.rows:,} rows, {found.quarantined_rows:,} would be quarantined "
                     f"({share:.1%})")
        console.print(_table("before cleansing (source columns)", found.before))
        console.print(_table("after cleansing (target fields, rows that pass)", found.after))
        if found.refused or found.warned:
            checks = Table(title="refused / warned per field and reason", title_justify="left")
            for column in ("field", "reason", "rows", "outcome"):
                checks.add_column(column, justify="right" if column == "rows" else "left")
            for (name, code), count in sorted(found.refused.items(), key=lambda i: -i[1]):
                checks.add_row(name or "(row)", code, f"{count:,}", "[red]quarantine[/]")
            for (name, code), count in sorted(found.warned.items(), key=lambda i: -i[1]):
                checks.add_row(name, code, f"{count:,}", "[yellow]warn, loaded[/]")
            console.print(checks)
    if html_file:
        html_file.write_text(render_html(mapping.name, profiles), encoding="utf-8")
        console.print(f"HTML report written to {html_file}")


def _table(title: str, columns) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("name", "missing", "distinct", "top values", "patterns"):
        table.add_column(column, justify="right" if column in ("missing", "distinct") else "left",
                         overflow="fold")
    for found in columns.values():
        table.add_row(found.name, f"{found.missing_rate:.1%}", f"{found.distinct:,}",
                      ", ".join(f"{v} ({c:,})" for v, c in found.top(3)),
                      ", ".join(f"{p} ({c:,})" for p, c in found.top_patterns(3)))
    return table
