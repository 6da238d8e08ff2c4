"""Field comparators: vectorised similarities in [0, 1] for arrays of candidate pairs (NaN = a side missing).

String methods run through rapidfuzz's `process.cpdist` (element-wise, multi-threaded, in C++) on the
distinct pairs of values only; values are normalised once per distinct value, never once per row or pair."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from rapidfuzz import fuzz, process
from rapidfuzz.distance import JaroWinkler, Levenshtein

from crmbridge.mappings.model import CompareSpec

STRING_METHODS = {"exact", "jaro_winkler", "levenshtein", "token_set", "pinyin"}
METHODS = STRING_METHODS | {"numeric", "date"}

# Fellegi-Sunter agreement levels: a similarity at or above the k-th cutoff is level k+1; 0 below all.
CUTOFFS: dict[str, tuple[float, ...]] = {
    "exact": (1.0,),
    "jaro_winkler": (1.0, 0.92, 0.8),
    "levenshtein": (1.0, 0.8, 0.6),
    "token_set": (1.0, 0.9, 0.75),
    "pinyin": (1.0, 0.9, 0.8),
    "numeric": (1.0, 0.5),
    "date": (1.0, 0.85, 0.5),
}

DATE_SWAPPED = 0.9  # day and month transposed (03/04 vs 04/03)
DATE_ONE_TYPO = 0.85  # one digit of YYYYMMDD differs


def _pinyin(text: str) -> str:
    """Han characters as tone-less pinyin syllables, so 张伟 and "Zhang Wei" compare as equal."""
    from pypinyin import lazy_pinyin  # imported on use: its dictionaries take a moment to load

    if not any("\u4e00" <= ch <= "\u9fff" for ch in text):
        return re.sub(r"[^\w\s]", " ", text).strip()
    return " ".join(s for s in lazy_pinyin(text) if s.strip())


def _date_int(value: object) -> int:
    if value is None or value is pd.NaT or (isinstance(value, float) and value != value):
        return -1
    digits = re.sub(r"\D", "", str(value)[:10] if not isinstance(value, str) else value)
    return int(digits[:8]) if len(digits) >= 8 else -1


@dataclass
class Prepared:
    """One field's values for every row, ready for comparison.

    Text fields are dictionary-encoded: `codes` gives each row's index into `values` (its distinct
    normalised texts), -1 where missing, so comparisons run once per distinct pair of values and `exact` is
    an integer comparison."""
    spec: CompareSpec
    codes: np.ndarray | None = None  # int64 per row, -1 = missing
    values: np.ndarray | None = None  # object array of the distinct texts (pinyin: spaced syllables)
    alt: np.ndarray | None = None  # pinyin: the syllables run together, per distinct text
    number: np.ndarray | None = None  # float64, NaN = missing; dates as YYYYMMDD


def prepare(column: pd.Series, spec: CompareSpec, memo: dict | None = None) -> Prepared:
    """`memo`: see `encode`; the matcher passes one per run so a column is encoded once."""
    if spec.method == "numeric":
        number = pd.to_numeric(pd.Series(column.tolist(), dtype=object), errors="coerce").to_numpy(dtype=float)
        return Prepared(spec, number=number)
    index, distinct = encode(column, DATE_TEXT, memo)
    if spec.method == "date":  # once per distinct value
        ints = np.array([_date_int(v) for v in distinct.to_pylist()] + [-1], dtype=float)
        number = ints[index]  # index -1 (missing) takes the extra -1
        number[number < 0] = np.nan
        return Prepared(spec, number=number)
    # NFKC (full-width letters and digits become ASCII), trimmed, lower case.
    codes, normal = recode(index, distinct, pc.utf8_lower(pc.utf8_trim_whitespace(
        pc.utf8_normalize(distinct, form="NFKC"))))
    if spec.method == "exact":  # equal codes are equal values: the texts are never needed
        return Prepared(spec, codes=codes)
    values = normal.to_numpy(zero_copy_only=False).astype(object)
    if spec.method == "pinyin":
        spaced = np.array([_pinyin(t) for t in values], dtype=object)
        joined = np.array([t.replace(" ", "") for t in spaced], dtype=object)
        empty = np.flatnonzero(spaced == "")  # nothing left once punctuation goes: missing
        codes = np.where(np.isin(codes, empty), -1, codes) if len(empty) else codes
        return Prepared(spec, codes=codes, values=spaced, alt=joined)
    return Prepared(spec, codes=codes, values=values)


DATE_TEXT = "%Y-%m-%d"  # how comparisons read a date column as text


def encode(column: pd.Series, date_format: str, memo: dict | None = None) -> tuple[np.ndarray, pa.Array]:
    """(index of every row's value in the column's distinct values, -1 = missing; the distinct values as
    text, dates written with `date_format`). Hashing a million strings is the costly step of blocking and
    comparison alike, so `memo` (one dict per frame, keyed by column name) lets them share it."""
    dates = pd.api.types.is_datetime64_any_dtype(column)
    key = ("encode", column.name, date_format if dates else None)
    if memo is not None and key in memo:
        return memo[key]
    if dates:
        column = column.dt.strftime(date_format)
    encoded = pc.dictionary_encode(arrow_text(column))
    result = encoded.indices.fill_null(-1).to_numpy().astype(np.int64), encoded.dictionary
    if memo is not None:
        memo[key] = result
    return result


def recode(index: np.ndarray, distinct: pa.Array, derived: pa.Array) -> tuple[np.ndarray, pa.Array]:
    """Rows' codes once every distinct value is replaced by `derived` (its normalised text, its key): (code
    per row, -1 = missing or ""; the distinct derived values). Distinct values that derive the same text share
    a code; when none changed (data already cleansed), the codes stay as they are without hashing again."""
    if pc.all(pc.equal(derived, distinct)).as_py() is not False:
        codes, values = index, derived
    else:
        encoded = pc.dictionary_encode(derived)
        values = encoded.dictionary
        codes = np.append(encoded.indices.to_numpy().astype(np.int64), -1)[index]  # -1: a missing row
    empty = np.flatnonzero(pc.equal(values, "").to_numpy(zero_copy_only=False))
    return (np.where(np.isin(codes, empty), -1, codes) if len(empty) else codes), values


def arrow_text(column: pd.Series) -> pa.Array:
    """The column's values as one Arrow large_string array (null = missing), whatever the pandas dtype."""
    arrow = pa.Array.from_pandas(column.astype("string")).cast(pa.large_string())
    return arrow.combine_chunks() if isinstance(arrow, pa.ChunkedArray) else arrow


def _cpdist(left: np.ndarray, right: np.ndarray, scorer) -> np.ndarray:
    if not len(left):
        return np.zeros(0)
    return process.cpdist(left, right, scorer=scorer, workers=-1, dtype=np.float64)


def similarity(prepared: Prepared, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Similarity of rows i[k] and j[k] for every k; NaN where either value is missing."""
    spec = prepared.spec
    if prepared.number is not None:
        a, b = prepared.number[i], prepared.number[j]
        missing = np.isnan(a) | np.isnan(b)
        sim = _date_similarity(a, b, spec.scale) if spec.method == "date" else _numeric_similarity(a, b, spec.scale)
        sim[missing] = np.nan
        return sim
    assert prepared.codes is not None
    a, b = prepared.codes[i], prepared.codes[j]
    present = (a >= 0) & (b >= 0)
    if spec.method == "exact":
        sim = (a == b).astype(np.float64)
    elif spec.method in STRING_METHODS:
        # Each distinct (left value, right value) once: blocking makes many pairs repeat one (same names).
        assert prepared.values is not None
        sim = np.zeros(len(a), dtype=np.float64)
        inverse, distinct = pd.factorize(a[present] * len(prepared.values) + b[present])  # hashing, no sort
        left, right = np.divmod(distinct, len(prepared.values))
        sim[present] = _text_similarity(prepared, left, right)[inverse]
    else:  # the loader accepts only METHODS
        raise ValueError(f"unknown comparison method `{spec.method}`")
    sim[~present] = np.nan
    return sim


def _text_similarity(prepared: Prepared, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Similarity of distinct values left[k] and right[k] (indices into `prepared.values`)."""
    method, values = prepared.spec.method, prepared.values
    assert values is not None
    a, b = values[left], values[right]
    if method == "jaro_winkler":
        return _cpdist(a, b, JaroWinkler.normalized_similarity)
    if method == "levenshtein":
        return _cpdist(a, b, Levenshtein.normalized_similarity)
    if method == "token_set":
        return _cpdist(a, b, fuzz.token_set_ratio) / 100.0
    assert method == "pinyin" and prepared.alt is not None
    return np.maximum(_cpdist(a, b, fuzz.token_sort_ratio) / 100.0,
                      _cpdist(prepared.alt[left], prepared.alt[right], JaroWinkler.normalized_similarity))


def _numeric_similarity(a: np.ndarray, b: np.ndarray, scale: float | None) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.clip(1.0 - np.abs(a - b) / (scale or 1.0), 0.0, 1.0)


def _date_similarity(a: np.ndarray, b: np.ndarray, scale: float | None) -> np.ndarray:
    """1 equal; 0.9 day/month swapped; 0.85 one digit off; then linear in days up to `scale` (365)."""
    a0, b0 = np.nan_to_num(a, nan=0).astype(np.int64), np.nan_to_num(b, nan=0).astype(np.int64)
    ya, ma, da = a0 // 10000, a0 // 100 % 100, a0 % 100
    yb, mb, db = b0 // 10000, b0 // 100 % 100, b0 % 100
    sim = np.zeros(len(a), dtype=np.float64)
    days = np.abs(_days(ya, ma, da) - _days(yb, mb, db)).astype(np.float64)
    sim = np.maximum(sim, np.clip(0.8 * (1.0 - days / (scale or 365.0)), 0.0, 0.8))
    differing = sum(((a0 // 10**k) % 10 != (b0 // 10**k) % 10).astype(np.int8) for k in range(8))
    one_off = differing == 1
    sim[one_off] = np.maximum(sim[one_off], DATE_ONE_TYPO)
    swapped = (ya == yb) & (ma == db) & (da == mb) & (ma != mb)
    sim[swapped] = DATE_SWAPPED
    sim[a0 == b0] = 1.0
    return sim


def _days(year: np.ndarray, month: np.ndarray, day: np.ndarray) -> np.ndarray:
    """Days since an epoch, tolerant of impossible dates (clipped), for distance only."""
    month = np.clip(month, 1, 12)
    day = np.clip(day, 1, 31)
    return year * 365.25 + (month - 1) * 30.44 + day


def levels(sim: np.ndarray, method: str) -> np.ndarray:
    """Agreement level of every similarity (-1 missing, 0 disagree ... len(cutoffs) exact)."""
    out = np.zeros(len(sim), dtype=np.int8)
    for cutoff in CUTOFFS[method]:
        out += (sim >= cutoff - 1e-6).astype(np.int8)  # float32 similarities: 0.9 is 0.89999998
    out[np.isnan(sim)] = -1
    return out
