"""The validated, interpolated mapping as plain objects the rest of crmbridge works with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_BATCH_SIZE = 50_000
ColumnType = str  # one of: string integer decimal float boolean date timestamp


@dataclass(frozen=True)
class TransformStep:
    name: str
    argument: Any = None
    path: str = ""  # where it sits in the mapping, for error messages


@dataclass(frozen=True)
class FieldSpec:
    name: str
    source_column: str | None
    constant: Any = None
    type: ColumnType = "string"
    transforms: tuple[TransformStep, ...] = ()
    required: bool = False
    pattern: str | None = None
    max_length: int | None = None
    ref: str | None = None
    mask: str = "none"


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    type: ColumnType
    timezone: str | None = None


@dataclass(frozen=True)
class Connection:
    name: str
    type: str
    options: dict[str, Any]
    timezone: str | None = None


@dataclass(frozen=True)
class Entity:
    name: str
    index: int
    source: str
    table: str | None
    query: str | None
    key: tuple[str, ...]
    columns: dict[str, ColumnSpec]
    target: str
    target_table: str
    external_id_column: str
    target_key_column: str
    mode: str
    create_table: bool
    fields: dict[str, FieldSpec]

    @property
    def parents(self) -> list[str]:
        return sorted({f.ref for f in self.fields.values() if f.ref})

    @property
    def source_columns(self) -> list[str]:
        """Source columns the entity reads: its key plus every field's `from`, in first-use order."""
        seen: dict[str, None] = dict.fromkeys(self.key)
        for spec in self.fields.values():
            if spec.source_column:
                seen.setdefault(spec.source_column)
        return list(seen)


@dataclass
class Mapping:
    path: Path
    name: str
    sha256: str
    sources: dict[str, Connection]
    targets: dict[str, Connection]
    entities: list[Entity]
    batch_size: int = DEFAULT_BATCH_SIZE
    state_dir: Path = field(default_factory=lambda: Path(".crmbridge"))
    timezone: str | None = None
    secrets: set[str] = field(default_factory=set, repr=False)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def entity(self, name: str) -> Entity:
        for entity in self.entities:
            if entity.name == name:
                return entity
        raise KeyError(name)

    def load_order(self) -> list[Entity]:
        """Entities with every parent before its children (the mapping is checked to be acyclic)."""
        done: list[Entity] = []
        placed: set[str] = set()
        pending = list(self.entities)
        while pending:
            ready = [e for e in pending if all(p in placed or p == e.name for p in e.parents)]
            if not ready:  # validation rejects cycles; this guards direct use of the model
                raise ValueError("entity references form a cycle")
            for entity in ready:
                done.append(entity)
                placed.add(entity.name)
                pending.remove(entity)
        return done

    def timezone_for(self, entity: Entity, column: str) -> str | None:
        spec = entity.columns.get(column)
        if spec and spec.timezone:
            return spec.timezone
        return self.sources[entity.source].timezone or self.timezone
