"""The columnar matcher (integer-coded keys and values, NumPy pair generation, components by pointer jumping)
against references: brute-force block pairs, a per-edge union-find, and the pairs, scores and clusters the
previous row-by-row implementation produced on a fixed data set."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from crmbridge.dedupe import Matcher, compare, keys
from crmbridge.dedupe.cluster import UnionFind, components
from crmbridge.dedupe.matcher import MatchResult, block_pairs
from crmbridge.mappings.model import CompareSpec, DedupeSpec

GIVEN = ["Anna", "Ben", "Chloé", "David", "Emma", "Finn", "Grace", "Hugo", "Ivy", "Jack", "Karl", "Lena", "Max",
         "Nora", "Omar", "Paula", "Quinn", "Rosa", "Sam", "Tara"]
FAMILY = ["Smith", "Smyth", "Murphy", "O'Brien", "Müller", "Mueller", "García", "Nguyen", "Kelly", "Walsh",
          "Byrne", "Ryan", "Doyle", "Brennan", "Lynch", "Moore", "Dubois", "Rossi", "Novak", "Berg"]
ALIAS = ["张伟", "Zhang Wei", "王芳", "Wang Fang", "李娜", "刘洋", "!!", ""]
STREETS = ["High Street", "Main Road", "Church Lane", "Harbour Road", "Mill Lane", "Station Road"]

BLOCKING = (("soundex(family_name)", "year(birth_date)"), ("email",), ("last7(phone)",),
            ("postcode", "initial(given_name)"), ("first3(family_name)", "month_day(birth_date)"),
            ("country",))  # 99% share one country: a block above MAX_BLOCK, skipped
COMPARE = (CompareSpec("given_name", "jaro_winkler", 2, min=0.8), CompareSpec("family_name", "jaro_winkler", 1.5),
           CompareSpec("birth_date", "date", 2), CompareSpec("email", "exact"),
           CompareSpec("phone", "levenshtein"), CompareSpec("address", "token_set"),
           CompareSpec("income", "numeric", 0.5, scale=1000), CompareSpec("alias", "pinyin"),
           CompareSpec("postcode", "exact", 0.5))
WEIGHTED = DedupeSpec(blocking=BLOCKING, rules=(("email", "birth_date"),), compare=COMPARE,
                      match_above=0.85, review_above=0.7)
FELLEGI_SUNTER = DedupeSpec(blocking=BLOCKING, rules=(("email", "birth_date"),), compare=COMPARE,
                            model="fellegi_sunter", match_above=0.9, review_above=0.5)


def people(seed: int = 3, originals: int = 2000, dups: int = 600) -> pd.DataFrame:
    """Namesakes from small pools, plus duplicates with typos, shouting and padded names, title-cased emails,
    local phone formats, full-width postcodes, swapped day/month and missing values."""
    rng = np.random.default_rng(seed)
    g, f = rng.choice(GIVEN, originals), rng.choice(FAMILY, originals)
    born = np.datetime64("1950-01-01") + rng.integers(0, 365 * 50, originals)
    base = pd.DataFrame({
        "given_name": g, "family_name": f, "birth_date": pd.to_datetime(born.astype("datetime64[D]")),
        "email": [f"{a.lower()}.{b.lower()}{n}@example.com"
                  for a, b, n in zip(g, f, rng.integers(0, 50, originals), strict=True)],
        "phone": [f"+44 20 79{n:05d}" for n in rng.integers(0, 3000, originals)],
        "address": [f"{n} {s}" for n, s in zip(rng.integers(1, 60, originals), rng.choice(STREETS, originals),
                                               strict=True)],
        "income": rng.integers(20, 90, originals) * 1000.0,
        "alias": rng.choice(ALIAS, originals),
        "postcode": [f"D{n:02d}" for n in rng.integers(1, 25, originals)],
        "country": np.where(rng.random(originals) < 0.99, "IE", "GB"),
    })
    dup = base.iloc[rng.integers(0, originals, dups)].reset_index(drop=True).copy()
    for column in ["given_name", "family_name", "address"]:
        for k in np.flatnonzero(rng.random(dups) < 0.3):
            value = dup.at[k, column]
            cut = int(rng.integers(1, len(value) - 1))
            dup.at[k, column] = value[:cut] + value[cut + 1:]
    shout = rng.random(dups) < 0.2
    dup.loc[shout, "family_name"] = ["  " + v.upper() + " " for v in dup.loc[shout, "family_name"]]
    dup.loc[shout, "email"] = [v.title() for v in dup.loc[shout, "email"]]
    local = rng.random(dups) < 0.3
    dup.loc[local, "phone"] = ["0" + v[4:].replace(" ", "-") for v in dup.loc[local, "phone"]]
    wide = rng.random(dups) < 0.1
    dup.loc[wide, "postcode"] = [v.translate(str.maketrans("0123456789D", "０１２３４５６７８９Ｄ"))
                                 for v in dup.loc[wide, "postcode"]]
    swap = rng.random(dups) < 0.1
    dup.loc[swap, "birth_date"] = [d.replace(month=d.day, day=d.month) if d.day <= 12 else d
                                   for d in dup.loc[swap, "birth_date"]]
    dup.loc[rng.random(dups) < 0.05, "income"] += 500.0
    for column, rate in [("email", 0.3), ("phone", 0.2), ("birth_date", 0.05), ("alias", 0.2), ("income", 0.1)]:
        dup.loc[rng.random(dups) < rate, column] = None
    frame = pd.concat([base, dup], ignore_index=True)
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)


def digest(result: MatchResult) -> str:
    """Pairs, clusters, scores (6 decimals), rules and counts in one short hash."""
    h = hashlib.sha256()
    for part in (result.i, result.j, result.labels):
        h.update(np.asarray(part, dtype=np.int64).tobytes())
    h.update(np.round(np.asarray(result.score, dtype=np.float64), 6).tobytes())
    h.update("\n".join(result.rule.tolist()).encode())
    h.update(repr(sorted((k, v) for k, v in result.stats.items() if not k.startswith("seconds"))).encode())
    return h.hexdigest()[:16]


# Recorded with the row-by-row implementation this one replaced (Python strings per row, DuckDB self-joins,
# one union per edge): the columnar one must find the same pairs, scores and clusters.
@pytest.mark.parametrize(("spec", "expected", "merged_rows"), [(WEIGHTED, "e434e29576a4c30a", 589),
                                                               (FELLEGI_SUNTER, "dc0e2fa623581e06", 588)])
def test_same_pairs_scores_and_clusters_as_the_row_by_row_matcher(spec: DedupeSpec, expected: str,
                                                                 merged_rows: int) -> None:
    frame = people()
    result = Matcher(spec).run(frame, frame.index.astype(str).tolist())
    stats = result.stats
    assert (stats["pairs_generated"], stats["pairs_compared"], stats["rows_in_skipped_blocks"]) == (15299, 12931, 2575)
    assert stats["merged_rows"] == merged_rows
    assert (np.bincount(result.labels) >= 3).any()  # clusters of three or more: the anti-chaining guard ran
    assert digest(result) == expected


def _brute_block_pairs(code: np.ndarray, max_block: int) -> tuple[set[tuple[int, int]], int]:
    pairs, skipped = set(), 0
    for value in set(code.tolist()) - {-1}:
        rows = np.flatnonzero(code == value).tolist()
        if len(rows) > max_block:
            skipped += len(rows)
            continue
        pairs |= {(a, b) for x, a in enumerate(rows) for b in rows[x + 1:]}
    return pairs, skipped


@pytest.mark.parametrize("seed", range(40))
def test_block_pairs_are_every_pair_sharing_a_code_once(seed: int) -> None:
    rng = np.random.default_rng(seed)
    code = rng.integers(-1, int(rng.integers(1, 12)), int(rng.integers(0, 80)))
    max_block = int(rng.integers(1, 10))
    i, j, skipped = block_pairs(code, max_block)
    found = list(zip(i.tolist(), j.tolist(), strict=True))
    assert (set(found), skipped) == _brute_block_pairs(code, max_block)
    assert len(found) == len(set(found)) and all(a < b for a, b in found)


@pytest.mark.parametrize("seed", range(20))
def test_components_match_a_union_find(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 300))
    edges = int(rng.integers(0, 2 * n + 1)) if n else 0
    i, j = rng.integers(0, max(n, 1), edges), rng.integers(0, max(n, 1), edges)
    keep = i < j  # the matcher's pairs: i < j
    uf = UnionFind(n)
    for a, b in zip(i[keep].tolist(), j[keep].tolist(), strict=True):
        uf.union(a, b)
    expected = np.array([uf.find(x) for x in range(n)], dtype=np.int64)
    assert components(n, i[keep], j[keep]).tolist() == expected.tolist()  # label: the smallest member


def test_a_long_chain_is_one_component() -> None:
    n = 5000
    order = np.random.default_rng(1).permutation(n)
    a, b = order[:-1], order[1:]
    labels = components(n, np.minimum(a, b), np.maximum(a, b))
    assert set(labels.tolist()) == {0}


def test_normalised_values_share_a_code() -> None:
    column = pd.Series(["  Smith", "SMITH ", "smith", "Ｓｍｉｔｈ", "Smyth", "", "   ", None], name="family")
    prepared = compare.prepare(column, CompareSpec("family", "exact"))
    assert prepared.codes is not None
    codes = prepared.codes.tolist()
    assert codes[0] == codes[1] == codes[2] == codes[3] != codes[4]
    assert codes[5:] == [-1, -1, -1]  # empty, blank and missing are all missing
    sims = compare.similarity(prepared, np.array([0, 0, 0]), np.array([3, 4, 5]))
    assert sims[:2].tolist() == [1.0, 0.0] and np.isnan(sims[2])


def test_string_similarity_is_computed_per_distinct_value_pair() -> None:
    column = pd.Series(["Martha", "Marhta", "Martha", "Dwayne", None, "Duane"], name="n")
    prepared = compare.prepare(column, CompareSpec("n", "jaro_winkler"))
    i, j = np.array([0, 2, 0, 3, 0]), np.array([1, 1, 4, 5, 2])
    sims = compare.similarity(prepared, i, j)
    assert sims[0] == sims[1] == pytest.approx(0.9611, abs=1e-4)  # the textbook Jaro-Winkler pair
    assert np.isnan(sims[2]) and sims[3] == pytest.approx(0.84, abs=1e-4) and sims[4] == 1.0


def test_key_codes_group_equal_keys_and_dates_read_alike_for_keys_and_comparisons() -> None:
    frame = pd.DataFrame({"name": ["Smith", "smith ", "Smyth", None, ""],
                          "born": pd.to_datetime(["1980-04-03", "1980-04-03", "1981-04-03", None, "1980-01-01"])})
    memo: dict = {}
    # The comparison reads dates as YYYY-MM-DD, the keys as YYYYMMDD: one memo serves both, apart.
    dates = compare.prepare(frame["born"], CompareSpec("born", "date"), memo).number
    assert dates is not None and dates[:3].tolist() == [19800403, 19800403, 19810403] and np.isnan(dates[3])
    assert keys.compute(frame, "born").tolist()[:3] == ["19800403", "19800403", "19810403"]
    name = keys.codes(frame, "name", memo).tolist()
    assert name[0] == name[1] != name[2] and name[3:] == [-1, -1]
    sound = keys.codes(frame, "soundex(name)", memo).tolist()
    assert sound[0] == sound[1] == sound[2] and sound[3:] == [-1, -1]
    year = keys.codes(frame, "year(born)", memo).tolist()
    assert year[0] == year[1] == year[4] != year[2] and year[3] == -1
    rule = keys.rule_codes(frame, ("soundex(name)", "year(born)"), memo).tolist()
    assert rule[0] == rule[1] != rule[2] and rule[3:] == [-1, -1]


def test_rule_codes_of_many_wide_keys_group_like_tuples(monkeypatch: pytest.MonkeyPatch) -> None:
    # Six keys of ~4,500 distinct values each: their mixed-radix product passes int64, so the codes are made
    # dense on the way; rows must still group exactly as their tuples of keys do.
    rng = np.random.default_rng(5)
    n = 12_000
    frame = pd.DataFrame({f"k{k}": rng.integers(0, 10_000, n).astype(str) for k in range(6)})
    frame.iloc[n // 2:] = frame.iloc[:n - n // 2].to_numpy()  # every tuple twice
    frame.loc[7, "k3"] = None
    dense = keys._dense
    calls: list[int] = []
    monkeypatch.setattr(keys, "_dense", lambda code: calls.append(len(code)) or dense(code))
    code = keys.rule_codes(frame, tuple(frame.columns))
    assert len(calls) == 2  # once on the way (the product would overflow), once at the end
    tuples = list(frame.itertuples(index=False, name=None))
    assert code[7] == -1 and (code >= 0).sum() == n - 1
    groups: dict[int, set] = {}
    for row in np.flatnonzero(code >= 0).tolist():
        groups.setdefault(int(code[row]), set()).add(tuples[row])
    assert all(len(members) == 1 for members in groups.values())  # one code, one tuple
    assert len(groups) == len({tuples[row] for row in np.flatnonzero(code >= 0).tolist()})
