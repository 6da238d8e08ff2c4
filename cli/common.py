"""What every command module shares: argument types, the error exit, loading a mapping, the state directory."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from crmbridge.cli.render import errors
from crmbridge.errors import MappingError
from crmbridge.mappings import load_mapping

MappingArg = Annotated[Path, typer.Argument(help="The mapping file (YAML).", show_default=False)]
ProjectOpt = Annotated[Path, typer.Option("--project", "-p", help="Project directory (holds .crmbridge/).")]
StateOpt = Annotated[Path | None, typer.Option("--state-dir", help="State directory, if not <project>/.crmbridge.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: message` on standard error; the caller raises the returned Exit."""
    errors.print(f"[red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code)


def load(path: Path):
    """The mapping, or every problem in it printed and exit code 2."""
    try:
        return load_mapping(path)
    except MappingError as error:
        errors.print(f"[red]{error}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def state_dir(project: Path, given: Path | None) -> Path:
    return given or project / ".crmbridge"
