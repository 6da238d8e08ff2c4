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
    columns: tuple[str, ...] = ()  # other source columns the step reads (coalesce, template, region_from)


@dataclass(frozen=True)
class RuleSpec:
    """One validation rule of a field (`rules:`); `crmbridge.mappings.rules` applies it."""

    kind: str  # required regex enum range length unique exists_in
    argument: Any
    severity: str = "reject"  # reject: quarantine the row; warn: load it and count it
    when: tuple[str, str, Any] | None = None  # (field, "present" | "equals" | "in", value)
    message: str | None = None
    path: str = ""


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
    rules: tuple[RuleSpec, ...] = ()
    protect: str = "none"  # none encrypt deterministic blind_index hash drop; `index`: a generated `<field>_bidx`
    personal_data: str | None = None  # data category, for the audit trail and the record of processing


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
class CompareSpec:
    """How one field is compared when matching duplicates (`dedupe.compare`)."""
    field: str
    method: str  # exact, jaro_winkler, levenshtein, token_set, pinyin, numeric, date
    weight: float = 1.0
    scale: float | None = None  # numeric/date: the distance at which the similarity reaches 0
    min: float | None = None  # below this similarity the pair cannot merge by score


@dataclass(frozen=True)
class DedupeSpec:
    """An entity's `dedupe:` block: blocking, comparisons, thresholds, review and survivorship."""
    blocking: tuple[tuple[str, ...], ...]
    compare: tuple[CompareSpec, ...]
    rules: tuple[tuple[str, ...], ...] = ()
    model: str = "weighted"  # or fellegi_sunter
    match_above: float = 0.9
    review_above: float = 0.75
    distinct_below: float | None = None  # anti-chaining guard; default review_above
    review_file: str | None = None
    survive: dict[str, str] = field(default_factory=dict)  # field -> strategy; `*` is the default
    recency_field: str | None = None
    priority_field: str | None = None
    priority_order: tuple[str, ...] = ()
    match_target: bool = False

    @property
    def keep_apart_below(self) -> float:
        return self.review_above if self.distinct_below is None else self.distinct_below


@dataclass(frozen=True)
class SyncSpec:
    """An entity's `sync:` block: how `crmbridge sync` reads changes incrementally and applies them."""
    watermark: str  # source column with each record's last-change timestamp
    overlap_seconds: float = 300.0  # re-read this far before the stored watermark (ties, clock skew, late commits)
    deleted_flag: str | None = None  # source column that is true for a deleted record (a tombstone)
    deletes: str = "ignore"  # delete | deactivate | ignore
    active_field: str | None = None  # boolean field set false by `deletes: deactivate`
    conflicts: str = "source_wins"  # source_wins | newest_wins | fields
    modified_field: str | None = None  # timestamp field compared by `newest_wins`
    target_fields: tuple[str, ...] = ()  # fields the target owns once a record exists (`conflicts: fields`)


def _rule_entity(rule: RuleSpec) -> str:
    return rule.argument if isinstance(rule.argument, str) else rule.argument["entity"]


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
    dedupe: DedupeSpec | None = None
    sync: SyncSpec | None = None
    subject: str | None = None  # field identifying the row's data subject (per-subject keys, erasure)

    @property
    def parents(self) -> list[str]:
        refs = {f.ref for f in self.fields.values() if f.ref}
        # `exists_in` rules look the value up in another entity's staged rows: that entity stages first.
        looked_up = {_rule_entity(r) for f in self.fields.values() for r in f.rules if r.kind == "exists_in"}
        return sorted((refs | looked_up) - {self.name})

    @property
    def source_columns(self) -> list[str]:
        """Source columns the entity reads: its key plus every field's `from`, in first-use order."""
        seen: dict[str, None] = dict.fromkeys(self.key)
        for spec in self.fields.values():
            if spec.source_column:
                seen.setdefault(spec.source_column)
            for step in spec.transforms:
                for column in step.columns:
                    seen.setdefault(column)
        return list(seen)


@dataclass(frozen=True)
class AuditSettings:
    """`settings.audit`: the audit store and what the record of processing states (see audit/)."""
    url: str | None = None  # default: SQLite `<state_dir>/audit.db`
    record_events: bool = True
    retention_days: int = 1095  # floor: three years (PIPL Art. 56)
    operator: str | None = None
    purpose: str | None = None
    lawful_basis: str | None = None
    data_subjects: tuple[str, ...] = ()
    recipients: tuple[str, ...] = ()
    transfers: tuple[str, ...] = ()
    signing_key: Path | None = None


@dataclass(frozen=True)
class ProtectionSettings:
    """The mapping's `protection:` block (paths already resolved against the mapping file)."""
    keyring: Path
    master_key_env: str = "CRMBRIDGE_MASTER_KEY"
    subjects: Path | None = None
    index_bytes: int = 16


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
    dask: str | None = None  # scale-out on a Dask cluster (docs/scale-out.md); the CLI's --dask overrides it
    secrets: set[str] = field(default_factory=set, repr=False)
    protection: ProtectionSettings | None = None
    audit: AuditSettings = field(default_factory=AuditSettings)

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
