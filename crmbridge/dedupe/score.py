"""Pair scores from field similarities: a weighted average, or Fellegi-Sunter match probabilities (m by EM
over the candidate pairs, u from random pairs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Below this share of the total weight present on both sides, a weighted score cannot merge on its own.
MIN_COVERAGE = 0.5


def weighted(sims: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(score, coverage) per pair: the weighted mean similarity over fields present on both sides."""
    present = ~np.isnan(sims)
    w = np.where(present, weights, 0.0)
    total = w.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(total > 0, (np.nan_to_num(sims) * w).sum(axis=1) / total, 0.0)
    return score, total / weights.sum()


@dataclass
class FellegiSunter:
    """m/u per field and agreement level; `levels` per field is -1 (missing) .. n_levels-1."""
    n_levels: list[int]
    m: list[np.ndarray] = field(default_factory=list)
    u: list[np.ndarray] = field(default_factory=list)
    prior: float = 0.01
    iterations: int = 0

    def fit(self, levels: np.ndarray, max_iterations: int = 50, tolerance: float = 1e-5) -> None:
        """EM over candidate pairs: m, u and the prior (the share of candidate pairs that match).

        Runs on the distinct agreement patterns weighted by their counts (a few thousand, whatever the
        number of pairs)."""
        patterns, _, counts = self._patterns(levels)
        counts = counts.astype(np.float64)
        # Seed the E-step rather than m: a pair that agrees exactly on most of its present fields starts as a
        # match. Blocking makes many candidate pairs agree on the blocked field, so a seed of "high m
        # everywhere" lets EM settle on "same family name" instead of "same person".
        top = np.array(self.n_levels) - 1
        present = patterns >= 0
        exact = ((patterns == top) & present).sum(axis=1) / np.maximum(present.sum(axis=1), 1)
        p = np.where(exact >= 0.6, 0.95, 0.05)
        previous = None
        for step in range(max_iterations):
            if step:
                p = self.probability(patterns)
            self.prior = float(np.clip((p * counts).sum() / counts.sum(), 1e-6, 1 - 1e-6))
            self.m = [self._frequencies(patterns[:, k], n, weights=p * counts)
                      for k, n in enumerate(self.n_levels)]
            self.u = [self._frequencies(patterns[:, k], n, weights=(1 - p) * counts)
                      for k, n in enumerate(self.n_levels)]
            self.iterations = step + 1
            if previous is not None and np.abs(p - previous).max() < tolerance:
                break
            previous = p

    def fit_u(self, random_levels: np.ndarray) -> None:
        """u from random pairs (nearly all non-matches); smoothing keeps an unseen agreement finite."""
        self.u = [self._frequencies(random_levels[:, k], n, smoothing=1.0) for k, n in enumerate(self.n_levels)]

    def log2_bayes(self, levels: np.ndarray) -> np.ndarray:
        """Per pair and field, log2(m/u) of the observed level (0 where missing)."""
        out = np.zeros(levels.shape, dtype=np.float64)
        for k in range(levels.shape[1]):
            ratio = np.log2(self.m[k]) - np.log2(self.u[k])
            lv = levels[:, k]
            out[:, k] = np.where(lv >= 0, ratio[np.clip(lv, 0, None)], 0.0)
        return out

    def probability(self, levels: np.ndarray) -> np.ndarray:
        if len(levels) > 4096:  # many pairs, few patterns: score each pattern once
            patterns, inverse, _ = self._patterns(levels)
            return self.probability(patterns)[inverse]
        weight = self.log2_bayes(levels).sum(axis=1) + np.log2(self.prior / (1 - self.prior))
        return 1.0 / (1.0 + np.exp2(-np.clip(weight, -60, 60)))

    def _patterns(self, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(distinct rows, inverse, counts) of a level matrix, via one integer code per row (a 1-D unique
        is many times faster than `np.unique(axis=0)`)."""
        codes = np.zeros(len(levels), dtype=np.int64)
        for k, n in enumerate(self.n_levels):
            codes = codes * (n + 1) + (levels[:, k].astype(np.int64) + 1)
        _, first, inverse, counts = np.unique(codes, return_index=True, return_inverse=True, return_counts=True)
        return levels[first], inverse.reshape(-1), counts

    @staticmethod
    def _frequencies(column: np.ndarray, n: int, weights: np.ndarray | None = None,
                     smoothing: float = 0.5) -> np.ndarray:
        present = column >= 0
        w = np.ones(len(column)) if weights is None else weights
        counts = np.bincount(column[present], weights=w[present], minlength=n)[:n] + smoothing
        return counts / counts.sum()
