"""Survivorship: the golden record of every cluster, field by field.

Strategies: first_non_null (staging order; the default), most_recent (by `recency_field`), most_complete
(the member with the most filled fields), source_priority (`priority_field` ranked by `priority_order`),
longest, max, min. Each picks among the members' non-missing values."""

from __future__ import annotations

import numpy as np
import pandas as pd

from crmbridge.mappings.model import DedupeSpec

STRATEGIES = ("first_non_null", "most_recent", "most_complete", "source_priority", "longest", "max", "min")


def strategy_for(spec: DedupeSpec, name: str) -> str:
    return spec.survive.get(name, spec.survive.get("*", "first_non_null"))


def golden(members: pd.DataFrame, cluster: np.ndarray, fields: list[str], spec: DedupeSpec) -> pd.DataFrame:
    """One row per cluster (index: cluster label) with the surviving value of every field.

    `members` is in staging order; `cluster` gives each member's cluster label."""
    frame = members.reset_index(drop=True).copy()
    frame["_cluster"] = cluster
    frame["_order"] = np.arange(len(frame))
    frame["_filled"] = frame[fields].notna().sum(axis=1)
    if spec.recency_field:
        frame["_recency"] = frame[spec.recency_field]
    if spec.priority_field:
        rank = {value: k for k, value in enumerate(spec.priority_order)}
        frame["_rank"] = frame[spec.priority_field].map(lambda v: rank.get(v, len(rank)))
    out = pd.DataFrame(index=pd.Index(sorted(set(cluster.tolist())), name="_cluster"))
    for name in fields:
        strategy = strategy_for(spec, name)
        column = frame[["_cluster", name]]
        if strategy in ("max", "min"):
            grouped = column.groupby("_cluster")[name]
            out[name] = grouped.max() if strategy == "max" else grouped.min()
            continue
        order = {
            "first_non_null": (["_order"], [True]),
            "most_recent": (["_recency", "_order"], [False, True]),
            "most_complete": (["_filled", "_order"], [False, True]),
            "source_priority": (["_rank", "_order"], [True, True]),
            "longest": (["_length", "_order"], [False, True]),
        }[strategy]
        if strategy == "longest":
            frame["_length"] = frame[name].map(lambda v: len(str(v)), na_action="ignore")
        ranked = frame.sort_values(order[0], ascending=order[1], na_position="last", kind="stable")
        present = ranked[ranked[name].notna()]
        out[name] = present.groupby("_cluster")[name].first()
    return out
