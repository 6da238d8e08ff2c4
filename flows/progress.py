"""How a run reports progress; the CLI plugs in rich progress bars, tests and services use the no-op."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def stage(self, entity: str, stage: str, total: int | None = None) -> None: ...

    def advance(self, entity: str, stage: str, rows: int) -> None: ...

    def done(self, entity: str, stage: str) -> None: ...


class NoProgress:
    def stage(self, entity: str, stage: str, total: int | None = None) -> None:
        pass

    def advance(self, entity: str, stage: str, rows: int) -> None:
        pass

    def done(self, entity: str, stage: str) -> None:
        pass


_reporter: Progress = NoProgress()


def current() -> Progress:
    """The reporter runs in this process use: the CLI installs its progress bars with `install`."""
    return _reporter


def install(reporter: Progress | None) -> None:
    """Report runs' progress to `reporter` (None: to nobody). Kept here, not in the flow's module: Prefect
    pickles the flow function by value for Dask workers, with every global it reads, and a live progress
    display (locks, a terminal) does not pickle."""
    global _reporter
    _reporter = reporter if reporter is not None else NoProgress()
