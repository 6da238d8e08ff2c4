"""The matcher: candidate pairs by blocking (DuckDB), vectorised comparisons, scores, guarded clusters.

It works on a pandas frame (one row per record, in staging order) so the same code serves a run's staging
table, the benchmarks and the tests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

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


class Matcher:
    def __init__(self, spec: DedupeSpec):
        self.spec = spec
        self.weights = np.array([c.weight for c in spec.compare], dtype=float)
        self.model: FellegiSunter | None = None
        self.prepared: list[compare.Prepared] = []
        self.rule_values: list[list[np.ndarray]] = []

    # --- preparation and candidates ---------------------------------------------------------------------

    def prepare(self, frame: pd.DataFrame) -> None:
        self.prepared = [compare.prepare(frame[c.field], c) for c in self.spec.compare]
        self.rule_values = [[compare.prepare(frame[name], CompareSpec(name, "exact")).text for name in rule]
                            for rule in self.spec.rules]

    def candidates(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        """Distinct pairs (i < j) agreeing on all keys of some blocking rule (or of a deterministic rule)."""
        con = duckdb.connect()
        con.execute("SET memory_limit = '1GB'")
        con.execute("CREATE TABLE pairs (i BIGINT, j BIGINT)")
        skipped = 0
        rules = list(self.spec.blocking) + list(self.spec.rules)
        for rule in rules:
            key = keys.rule_key(frame, tuple(rule))
            present = key.notna().to_numpy()
            table = pa.table({"pos": pa.array(np.flatnonzero(present), pa.int64()),
                              "k": pa.Array.from_pandas(key[present]).cast(pa.string())})
            con.register("block_keys", table)
            skipped += con.execute("""
                SELECT coalesce(sum(n), 0) FROM (SELECT count(*) AS n FROM block_keys GROUP BY k)
                WHERE n > ?""", [MAX_BLOCK]).fetchone()[0]
            con.execute("""
                INSERT INTO pairs
                WITH sized AS (SELECT pos, k, count(*) OVER (PARTITION BY k) AS n FROM block_keys)
                SELECT a.pos, b.pos FROM sized a JOIN sized b ON a.k = b.k AND a.pos < b.pos
                WHERE a.n <= ?""", [MAX_BLOCK])
            con.unregister("block_keys")
        generated = con.execute("SELECT count(*) FROM pairs").fetchone()[0]
        found = con.execute("SELECT DISTINCT i, j FROM pairs ORDER BY i, j").fetchnumpy()
        con.close()
        return (found["i"].astype(np.int64), found["j"].astype(np.int64),
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
                hit &= (a != "") & (a == b)
            out[(out == "") & hit] = "rule:" + "+".join(rule)
        return out

    # --- the whole pass -----------------------------------------------------------------------------------

    def run(self, frame: pd.DataFrame, ids: list[str] | None = None,
            decisions: dict[tuple[str, str], str] | None = None, frozen: int = 0) -> MatchResult:
        """Match `frame`. Its first `frozen` rows (records already in the target) are never paired with
        each other, only with the rows after them."""
        started = time.perf_counter()
        n = len(frame)
        self.prepare(frame)
        i, j, stats = self.candidates(frame)
        if frozen:
            keep = j >= frozen  # i < j, so this drops exactly the pairs of two frozen rows
            i, j = i[keep], j[keep]
        t_block = time.perf_counter()
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
