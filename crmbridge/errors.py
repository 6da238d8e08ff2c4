"""Exceptions that carry enough context for a clear message, and never a data value."""

from __future__ import annotations

from dataclasses import dataclass


class CrmbridgeError(Exception):
    """Base class: the message is safe to print (no secrets, no personal data)."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a mapping file, located as precisely as we can."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        at = f" at {self.path}" if self.path else ""
        return f"{where}{at}: {self.message}"


class MappingError(CrmbridgeError):
    """A mapping file failed validation; holds every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        count = len(problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in the mapping:\n{lines}")


class SourceError(CrmbridgeError):
    """A source could not be read (unreachable, wrong encoding, schema drift, ...)."""


class SchemaDriftError(SourceError):
    """The source's actual columns or types no longer match what the mapping expects."""


class TargetError(CrmbridgeError):
    """A target could not be reached or written."""


class ReconciliationError(CrmbridgeError):
    """Source rows do not balance with the buckets they ended in."""
