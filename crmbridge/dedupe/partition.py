"""Candidate pairs and their comparisons, partitioned by blocking key so workers can share them.

A blocking rule's pairs never leave its blocks, and a block is the rows sharing one key. So each rule's rows
are split by key code into parts (every block whole in one part), and each part is a job of its own: the
rows' compared fields and block codes in, their pairs (as global row positions) and similarities out. A job
needs nothing else, so it runs on any worker (a Dask cluster's, through the flow's task runner).

The pairs of all jobs, made distinct and sorted, are exactly `Matcher.candidates`'s, with exactly the
similarities `Matcher.similarities` gives them: no comparison depends on rows outside the pair, and each
part holds whole blocks. Scoring, the model fit and clustering stay global (`Matcher.run`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from crmbridge.dedupe import compare, keys
from crmbridge.dedupe.matcher import MAX_BLOCK, Matcher, block_pairs, pairable_rows
from crmbridge.mappings.model import DedupeSpec


@dataclass
class PartJob:
    """One part of one blocking rule: whole blocks of rows, with what comparing them needs."""

    rule: int  # index into the spec's blocking rules followed by its deterministic rules
    rows: np.ndarray  # global row positions, ascending
    codes: np.ndarray  # the rule's block code of each of those rows
    frame: pd.DataFrame  # those rows, only the compared fields


@dataclass
class PartPairs:
    i: np.ndarray  # global row positions, i < j
    j: np.ndarray
    sims: np.ndarray  # pairs x compared fields, as `Matcher.similarities`


# How jobs run: in order here, or handed to workers (the flow submits each as a task). Jobs come lazily, so
# a runner that keeps a bounded number in flight holds only those rows.
RunJobs = Callable[[DedupeSpec, Iterable[PartJob]], list[PartPairs]]
PARTS = 4  # parts per blocking rule when a run spreads dedupe over workers


def compare_part(spec: DedupeSpec, job: PartJob) -> PartPairs:
    """A job's pairs and similarities; runs anywhere."""
    local_i, local_j, _ = block_pairs(job.codes, MAX_BLOCK)
    matcher = Matcher(spec)
    memo: dict = {}  # only the compared fields: the caller settled the blocks
    matcher.prepared = [compare.prepare(job.frame[c.field], c, memo) for c in spec.compare]
    return PartPairs(job.rows[local_i], job.rows[local_j], matcher.similarities(local_i, local_j))


def run_here(spec: DedupeSpec, jobs: Iterable[PartJob]) -> list[PartPairs]:
    return [compare_part(spec, job) for job in jobs]


def part_jobs(spec: DedupeSpec, frame: pd.DataFrame, parts: int, stats: dict[str, int],
              memo: dict | None = None) -> Iterator[PartJob]:
    """Every rule's rows that can pair (blocks of 2 to MAX_BLOCK rows), split into `parts` by block code;
    counts the rows of skipped (too large) blocks into `stats`."""
    fields = list(dict.fromkeys(c.field for c in spec.compare))
    stats.setdefault("rows_in_skipped_blocks", 0)
    for index, rule in enumerate([*spec.blocking, *spec.rules]):
        code = keys.rule_codes(frame, tuple(rule), memo)
        rows, skipped = pairable_rows(code, MAX_BLOCK)
        stats["rows_in_skipped_blocks"] += skipped
        part_of = code[rows] % parts  # dense codes: consecutive blocks go to different parts
        for part in range(parts):
            mine = rows[part_of == part]
            if len(mine):
                yield PartJob(index, mine, code[mine], frame.iloc[mine][fields].reset_index(drop=True))


def compared_pairs(spec: DedupeSpec, frame: pd.DataFrame, parts: int, run_jobs: RunJobs = run_here,
                   memo: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """(i, j, sims, stats) as `Matcher.candidates` then `Matcher.similarities` give them, computed in parts."""
    stats: dict[str, int] = {}
    results = run_jobs(spec, part_jobs(spec, frame, parts, stats, memo))
    width = len(spec.compare)
    if not results:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, width), dtype=np.float32), {"pairs_generated": 0, **stats}
    i = np.concatenate([r.i for r in results])
    j = np.concatenate([r.j for r in results])
    sims = np.concatenate([r.sims for r in results]) if width else np.zeros((len(i), 0), dtype=np.float32)
    key = i * max(len(frame), 1) + j
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, dtype=bool)
    pick = order[first]  # a pair two rules found: the same similarities either way, kept once
    return i[pick], j[pick], sims[pick], {"pairs_generated": len(i), **stats}


def matcher_pairs(matcher: Matcher, parts: int, run_jobs: RunJobs = run_here):
    """A `pairs` hook for `Matcher.run`: candidates and similarities in parts."""

    def pairs(frame: pd.DataFrame, memo: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
        return compared_pairs(matcher.spec, frame, parts, run_jobs, memo)

    return pairs
