"""The matcher: candidate pairs by blocking, vectorised comparisons, scores, guarded clusters.

It works on a pandas frame (one row per record, in staging order) so the same code serves a run's staging
table, the benchmarks and the tests. Columnar throughout: each column is dictionary-encoded once (Arrow),
keys and values become integer codes, candidate pairs come from sorting those codes (NumPy), and strings
are compared once per distinct pair of values; no Python object is made per row or per pair."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from crmbridge.dedupe import compare, keys
from crmbridge.dedupe.cluster import guarded_clusters
from crmbridge.dedupe.score import MIN_COVERAGE, FellegiSunter, weighted
from crmbridge.mappings.model import CompareSpec, DedupeSpec

# A block this large (e.g. everyone with no email sharing one key) would dominate the pair count; such
# blocks are skipped and counted, other rules still reach those rows.
MAX_BLOCK = 2000
RANDOM_PAIRS = 200_000  # for the u probabilities
PAIR_CHUNK = 1_000_000
APPROVE, REJECT = "approve", "reject"


@dataclass
class MatchResult:
    i: np.ndarray  # scored pairs (row positions, i < j)
    j: np.ndarray
    score: np.ndarray
    rule: np.ndarray  # object: why the pair matched (or its decision); "" for a scored pair
    sims: np.ndarray  # pairs x compare fields
    labels: np.ndarray  # cluster label (first row position) per row
    stats: dict[str, float] = field(default_factory=dict)

    def matched(self, spec: DedupeSpec) -> np.ndarray:
        return (self.rule != "") & (self.rule != f"review:{REJECT}") | (
            (self.rule == "") & (self.score >= spec.match_above))

    def for_review(self, spec: DedupeSpec) -> np.ndarray:
        return (self.rule == "") & (self.score >= spec.review_above) & (self.score < spec.match_above)


def pairable_rows(code: np.ndarray, max_block: int) -> tuple[np.ndarray, int]:
    """Rows (ascending) in blocks of 2 to `max_block` rows by block code (>= 0; -1 = no key), and the number
    of rows in blocks skipped for being larger."""
    present = np.flatnonzero(code >= 0)
    size = np.bincount(code[present]) if len(present) else np.zeros(0, dtype=np.int64)
    row_size = size[code[present]]
    return present[(row_size >= 2) & (row_size <= max_block)], int(size[size > max_block].sum())


def block_pairs(code: np.ndarray, max_block: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every pair (i < j) of rows sharing a block code (>= 0; -1 = no key), blocks of more than `max_block`
    rows skipped; plus the number of rows in skipped blocks.

    NumPy only: rows sorted by code (stable, so ascending within a block), then each row is paired with
    the rows after it in its block."""
    none = np.zeros(0, dtype=np.int64)
    rows, skipped = pairable_rows(code, max_block)
    if not len(rows):
        return none, none, skipped
    rows = rows[np.argsort(code[rows], kind="stable")]
    block = code[rows]
    starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
    ends = np.r_[starts[1:], len(rows)].astype(np.int64)
    after = np.repeat(ends, ends - starts) - np.arange(len(rows)) - 1  # rows after each one in its block
    first = np.cumsum(after) - after  # where each row's pairs start in the output
    total = int(after.sum())
    partner = np.arange(total) - np.repeat(first - np.arange(1, len(rows) + 1), after)
    return np.repeat(rows, after).astype(np.int64), rows[partner].astype(np.int64), skipped


class Matcher:
    def __init__(self, spec: DedupeSpec):
        self.spec = spec
        self.weights = np.array([c.weight for c in spec.compare], dtype=float)
        self.model: FellegiSunter | None = None
        self.prepared: list[compare.Prepared] = []
        self.rule_values: list[list[np.ndarray]] = []

    # --- preparation and candidates ---------------------------------------------------------------------

    def prepare(self, frame: pd.DataFrame, memo: dict | None = None) -> None:
        """`memo`: one dict per frame, shared with `candidates` so each column is encoded once."""
        self.prepared = [compare.prepare(frame[c.field], c, memo) for c in self.spec.compare]
        self.rule_values = [[compare.prepare(frame[name], CompareSpec(name, "exact"), memo).codes
                             for name in rule] for rule in self.spec.rules]

    def candidates(self, frame: pd.DataFrame,
                   memo: dict | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """Distinct pairs (i < j) agreeing on all keys of some blocking rule (or of a deterministic rule),
        sorted by (i, j)."""
        found: list[np.ndarray] = []
        generated = skipped = 0
        n = len(frame)
        for rule in list(self.spec.blocking) + list(self.spec.rules):
            i, j, skipped_rows = block_pairs(keys.rule_codes(frame, tuple(rule), memo), MAX_BLOCK)
            found.append(i * n + j)  # one int64 per pair: i * n + j < n² fits for any realistic n
            generated += len(i)
            skipped += skipped_rows
        pairs = np.sort(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)
        pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]] if len(pairs) else pairs  # distinct, sorted
        return (pairs // max(n, 1), pairs % max(n, 1),
                {"pairs_generated": int(generated), "rows_in_skipped_blocks": int(skipped)})

    # --- comparison and scores --------------------------------------------------------------------------

    def similarities(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Pairs x fields, float32 (half the memory; levels and scores need no more), in chunks so the
        per-field temporaries (both sides' values) stay bounded whatever the pair count."""
        sims = np.empty((len(i), len(self.prepared)), dtype=np.float32)
        for start in range(0, len(i), PAIR_CHUNK):
            a, b = i[start:start + PAIR_CHUNK], j[start:start + PAIR_CHUNK]
            for k, prepared in enumerate(self.prepared):
                sims[start:start + len(a), k] = compare.similarity(prepared, a, b)
        return sims

    def levels(self, sims: np.ndarray) -> np.ndarray:
        return np.column_stack([compare.levels(sims[:, k], c.method) for k, c in enumerate(self.spec.compare)]) \
            if len(self.spec.compare) else np.zeros((len(sims), 0), dtype=np.int8)

    def fit(self, n: int, sims: np.ndarray, seed: int = 1) -> None:
        """Fellegi-Sunter only. m comes from EM over the candidate pairs; u from random pairs; the prior is
        the candidates' match rate spread over all n(n-1)/2 pairs.

        Candidate-only u would be conditional on blocking: non-matching candidates almost never share a
        city, so a shared city would weigh ~20 bits and outvote every disagreement (measured on 100k
        synthetic customers: precision 0.976); EM with u fixed from random pairs instead explains the
        blocked non-matches as matches (FEBRL3 precision 0.0006). Together they hold (bench/dedupe.py)."""
        if self.spec.model != "fellegi_sunter":
            return
        if not len(sims):  # nothing to learn from, nothing to score
            self.model = None
            return
        self.model = FellegiSunter([len(compare.CUTOFFS[c.method]) + 1 for c in self.spec.compare])
        self.model.fit(self.levels(sims))
        total = n * (n - 1) // 2
        if total > len(sims):
            rng = np.random.default_rng(seed)
            count = min(RANDOM_PAIRS, total)
            ri, rj = rng.integers(0, n, count), rng.integers(0, n, count)
            keep = ri != rj
            self.model.fit_u(self.levels(self.similarities(ri[keep], rj[keep])))
            self.model.prior = float(np.clip(self.model.prior * len(sims) / total, 1e-12, 0.5))

    def scores(self, sims: np.ndarray) -> np.ndarray:
        if self.spec.model == "fellegi_sunter":
            score = (self.model.probability(self.levels(sims)) if self.model is not None
                     else np.zeros(len(sims)))  # no candidate pairs were found to learn from
        else:
            score, coverage = weighted(sims, self.weights)
            # Too little in common to decide alone: at most a review.
            score = np.where(coverage < MIN_COVERAGE, np.minimum(score, self.spec.review_above), score)
        # A field below its `min` vetoes: not a match, not even a review (and it keeps clusters apart).
        for k, c in enumerate(self.spec.compare):
            if c.min is not None:
                veto = sims[:, k] < c.min  # NaN (missing) never vetoes
                floor = min(self.spec.review_above, self.spec.keep_apart_below) * 0.999
                score = np.where(veto, np.minimum(score, floor), score)
        return score

    def rules_for(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """The first deterministic rule each pair satisfies ("rule:a+b"), else ""."""
        out = np.full(len(i), "", dtype=object)
        for rule, values in zip(self.spec.rules, self.rule_values, strict=True):
            hit = np.ones(len(i), dtype=bool)
            for column in values:
                a, b = column[i], column[j]
                hit &= (a >= 0) & (a == b)  # codes of the normalised values; -1 = missing
            out[(out == "") & hit] = "rule:" + "+".join(rule)
        return out

    # --- the whole pass -----------------------------------------------------------------------------------

    def run(self, frame: pd.DataFrame, ids: list[str] | None = None,
            decisions: dict[tuple[str, str], str] | None = None, frozen: int = 0,
            pairs: Callable[[pd.DataFrame, dict], tuple] | None = None) -> MatchResult:
        """Match `frame`. Its first `frozen` rows (records already in the target) are never paired with
        each other, only with the rows after them. `pairs(frame, memo)` -> (i, j, sims, stats) finds and
        compares the candidates elsewhere, with the same result (crmbridge.dedupe.partition: on workers)."""
        started = time.perf_counter()
        n = len(frame)
        memo: dict = {}
        self.prepare(frame, memo)
        sims = None
        if pairs is None:
            i, j, stats = self.candidates(frame, memo)
        else:
            i, j, sims, stats = pairs(frame, memo)
        del memo
        if frozen:
            keep = j >= frozen  # i < j, so this drops exactly the pairs of two frozen rows
            i, j = i[keep], j[keep]
            sims = None if sims is None else sims[keep]
        t_block = time.perf_counter()
        if sims is None:
            sims = self.similarities(i, j)
        self.fit(n, sims)
        score = self.scores(sims)
        rule = self.rules_for(i, j)
        if decisions and ids is not None:
            self._apply_decisions(i, j, rule, ids, decisions)
        t_score = time.perf_counter()

        result = MatchResult(i, j, score, rule, sims, np.arange(n))
        matched = result.matched(self.spec)
        # What the guard needs to know about compared pairs: the clearly different ones and the decided ones.
        telling = (score < self.spec.keep_apart_below) | (rule != "")
        known_score = np.where(rule == f"review:{REJECT}", -np.inf, np.where(rule != "", 1.0, score))
        known = (i[telling], j[telling], known_score[telling])

        def score_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            extra = self.scores(self.similarities(a, b))
            extra_rules = self.rules_for(a, b)
            return np.where(extra_rules != "", 1.0, extra)

        edge_score = np.where(rule[matched] != "", 1.0, score[matched])
        result.labels = guarded_clusters(n, i[matched], j[matched], edge_score, self.spec.keep_apart_below,
                                         score_pairs, known)
        stats.update({"rows": n, "pairs_compared": len(i), "matched_pairs": int(matched.sum()),
                      "review_pairs": int(result.for_review(self.spec).sum()),
                      "clusters": int((np.bincount(result.labels, minlength=n) > 1).sum()) if n else 0,
                      "merged_rows": int((result.labels != np.arange(n)).sum()),
                      "seconds_blocking": round(t_block - started, 3),
                      "seconds_scoring": round(t_score - t_block, 3),
                      "seconds_total": round(time.perf_counter() - started, 3)})
        result.stats = stats
        return result

    @staticmethod
    def _apply_decisions(i: np.ndarray, j: np.ndarray, rule: np.ndarray, ids: list[str],
                         decisions: dict[tuple[str, str], str]) -> None:
        for k, (a, b) in enumerate(zip(i.tolist(), j.tolist(), strict=True)):
            pair = (ids[a], ids[b]) if ids[a] < ids[b] else (ids[b], ids[a])
            decision = decisions.get(pair)
            if decision in (APPROVE, REJECT):
                rule[k] = f"review:{decision}"
