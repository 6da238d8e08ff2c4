"""Clusters from matched pairs, guarded against chaining: A~B and B~C do not put A and C together when A
and C are clearly different (or a person rejected that pair)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Above this many rows, a connected group is not re-checked pair by pair (k² comparisons); only its
# compared pairs guard it.
FULL_CHECK_LIMIT = 400


class UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return int(root)

    def labels(self) -> np.ndarray:
        """The root of every element, by pointer jumping over the whole array (a few NumPy passes instead of
        one `find` call per row)."""
        return _flatten(self.parent.copy())

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smallest position (first staged row) is the root


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label (its smallest member) of every row.

    In NumPy rounds rather than one union per edge: every edge whose ends have different roots hooks the
    larger root under the smaller, then pointer jumping flattens the forest; edges already inside one
    component drop out. Roots only decrease, so it ends; each root is its component's smallest row."""
    labels = np.arange(n)
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    while len(i):
        left, right = labels[i], labels[j]
        apart = left != right
        if not apart.any():
            break
        i, j, left, right = i[apart], j[apart], left[apart], right[apart]
        np.minimum.at(labels, np.maximum(left, right), np.minimum(left, right))
        labels = _flatten(labels)
    return labels


def _flatten(parent: np.ndarray) -> np.ndarray:
    """Every element's root, by pointer jumping (parent[x] <= x, roots point to themselves)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def guarded_clusters(n: int, i: np.ndarray, j: np.ndarray, score: np.ndarray, keep_apart_below: float,
                     score_pairs: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     known: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The cluster label (its first row) of every row.

    Match edges are taken strongest first; two clusters join only if no pair across them scores below
    `keep_apart_below`. `known` holds pairs already scored (i, j, score; a rejected pair scores -inf);
    cross pairs never compared are scored by `score_pairs`."""
    labels = components(n, i, j)
    sizes = np.bincount(labels, minlength=n)
    multi = np.flatnonzero(sizes >= 3)
    if not len(multi):  # pairs only: nothing can chain, the components are the clusters
        return labels
    # Only groups of three or more need the guard; a pair's one edge always joins it.
    guarded = sizes[labels] >= 3
    known_pairs: dict[tuple[int, int], float] = {}
    if known is not None:
        ki, kj, ks = known
        inside = guarded[ki] & (labels[ki] == labels[kj])  # only groups the guard checks
        known_pairs = dict(zip(zip(ki[inside].tolist(), kj[inside].tolist(), strict=True),
                               ks[inside].tolist(), strict=True))
    known = known_pairs  # type: ignore[assignment]
    # Pairs of small connected groups of three or more that were never compared: score them in one go.
    missing_i, missing_j = [], []
    groups: dict[int, list[int]] = {}
    for row in np.flatnonzero(guarded).tolist():
        groups.setdefault(int(labels[row]), []).append(row)
    for members in groups.values():
        if len(members) > FULL_CHECK_LIMIT:
            continue
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                pair = (members[x], members[y])
                if pair not in known:
                    missing_i.append(pair[0])
                    missing_j.append(pair[1])
    if missing_i:
        extra = score_pairs(np.array(missing_i), np.array(missing_j))
        known = {**known, **dict(zip(zip(missing_i, missing_j, strict=True), extra.tolist(), strict=True))}

    edges = np.flatnonzero(guarded[i])
    order = edges[np.argsort(-score[edges], kind="stable")]  # strongest first, as over all edges
    uf = UnionFind(n)
    members: dict[int, list[int]] = {}
    for k in order.tolist():
        a, b = int(i[k]), int(j[k])
        ra, rb = uf.find(a), uf.find(b)
        if ra == rb:
            continue
        left, right = members.get(ra, [ra]), members.get(rb, [rb])
        if len(left) + len(right) > 2 and not _compatible(left, right, known, keep_apart_below):
            continue
        uf.union(a, b)
        root = uf.find(a)
        members[root] = left + right
        members.pop(ra if ra != root else rb, None)
    return np.where(guarded, uf.labels(), labels)


def _compatible(left: list[int], right: list[int], known, floor: float) -> bool:
    for x in left:
        for y in right:
            value = known.get((x, y) if x < y else (y, x))
            if value is not None and value < floor:
                return False
    return True
