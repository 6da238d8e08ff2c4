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
