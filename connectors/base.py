"""The small protocol every connector implements: a Source yields batches, a Target upserts them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from crmbridge.mappings.model import Connection, Entity, Mapping


@dataclass(frozen=True)
class ColumnInfo:
    """A column as the source really has it (for schema-drift checks)."""

    name: str
    type: str  # string integer decimal float boolean date timestamp, or "unknown"
    native: str = ""  # the system's own name for the type
    timezone_aware: bool | None = None  # timestamps only


@dataclass(frozen=True)
class Rejected:
    """A source row that could not even be read as a row (broken quoting, wrong field count, ...)."""

    row_number: int
    reason: str
    detail: str  # what was expected; never the row's content


@dataclass
class SourceBatch:
    frame: pd.DataFrame  # one column per requested source column, one row per readable source row
    row_numbers: np.ndarray  # position of each row in the source (line number for text files)
    rejected: list[Rejected] = field(default_factory=list)


class Source(Protocol):
    def columns(self) -> list[ColumnInfo] | None:
        """The real columns, or None when the format cannot tell before reading (e.g. JSON Lines)."""

    def read(self, columns: Sequence[str], batch_size: int) -> Iterator[SourceBatch]:
        """Stream the rows in batches of at most `batch_size`, holding one batch in memory at a time."""

    def close(self) -> None: ...


@dataclass
class ExistingRow:
    target_key: Any
    values: dict[str, Any]  # field name -> value as the target holds it


@dataclass(frozen=True)
class WriteFailure:
    external_id: str
    reason: str  # reason code
    detail: str  # error class and constraint, never the database's message text (it can echo values)


class Target(Protocol):
    def prepare(self, entity: Entity, dry_run: bool) -> None:
        """Check (or create) the entity's table; raise TargetError with what is missing."""

    def fetch_existing(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, ExistingRow]: ...

    def write(self, entity: Entity, rows: list[dict[str, Any]]) -> list[WriteFailure]:
        """Upsert rows (each has the external id column) and return the rows the target refused."""

    def target_keys(self, entity: Entity, external_ids: Sequence[str]) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RestoreRow:
    """One record to put back as it was before a run: the external id, the target key it had, and the values
    of the fields to restore, already converted to the fields' types (a full record when re-creating)."""

    external_id: str
    target_key: Any
    values: dict[str, Any]


@runtime_checkable
class ReversibleTarget(Protocol):
    """The optional capability `crmbridge rollback` needs: a target without it cannot roll a run back.

    Each call returns the records the target refused (by external id, reason code and error class); the
    rest are done and committed when the call returns, so a rollback killed in between resumes safely.
    """

    def delete(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        """Delete the records a run created (`values` is empty); a record already gone is not a failure."""

    def restore(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        """Set exactly the given fields of existing records back to their before-image values."""

    def recreate(self, entity: Entity, rows: Sequence[RestoreRow]) -> list[WriteFailure]:
        """Bring back records a run deleted, with their target key where the target lets the key be chosen
        (a CRM that cannot may undelete them from its recycle bin instead)."""


class Connector:
    """One configured system (an entry under `sources:` or `targets:`)."""

    kind: str = ""
    can_read = True
    can_write = False

    def __init__(self, connection: Connection, mapping: Mapping):
        self.connection = connection
        self.mapping = mapping

    @property
    def base_dir(self) -> Path:
        return self.mapping.base_dir

    def open_source(self, entity: Entity) -> Source:
        raise NotImplementedError(f"{self.kind} cannot be read")

    def open_target(self) -> Target:
        raise NotImplementedError(f"{self.kind} cannot be written")

    def describe(self) -> str:
        """A short, secret-free description for messages (e.g. `sqlite:///legacy.db`)."""
        return self.kind
