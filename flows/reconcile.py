"""Reconciliation: every source row must end in exactly one bucket, per entity, or the run fails."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from crmbridge.staging import Staging

BUCKETS = ("created", "updated", "unchanged", "merged", "quarantined")


@dataclass
class EntityReconciliation:
    entity: str
    source: int
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    merged: int = 0
    quarantined: int = 0
    in_two_buckets: int = 0

    @property
    def accounted(self) -> int:
        return self.created + self.updated + self.unchanged + self.merged + self.quarantined

    @property
    def balanced(self) -> bool:
        return self.accounted == self.source and self.in_two_buckets == 0

    def as_dict(self) -> dict[str, int | str | bool]:
        return {**asdict(self), "accounted": self.accounted, "balanced": self.balanced}


def reconcile_entity(staging: Staging, entity: str) -> EntityReconciliation:
    actions = staging.action_counts(entity)
    return EntityReconciliation(
        entity=entity,
        source=staging.source_rows(entity),
        created=actions.get("created", 0),
        updated=actions.get("updated", 0),
        unchanged=actions.get("unchanged", 0),
        merged=actions.get("merged", 0),
        quarantined=staging.quarantine_count(entity),
        in_two_buckets=staging.rows_in_two_buckets(entity),
    )


def unbalanced_message(rows: list[EntityReconciliation]) -> str | None:
    wrong = [r for r in rows if not r.balanced]
    if not wrong:
        return None
    parts = [f"`{r.entity}`: {r.source} source rows but {r.accounted} accounted for"
             + (f", {r.in_two_buckets} rows in two buckets" if r.in_two_buckets else "") for r in wrong]
    return "reconciliation does not balance: " + "; ".join(parts)
