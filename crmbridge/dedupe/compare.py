"""Field comparators: vectorised similarities in [0, 1] for arrays of candidate pairs (NaN = a side missing).

String methods run through rapidfuzz's `process.cpdist` (element-wise, multi-threaded, in C++); values are
prepared once per row, never once per pair."""

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
    """One field's values for every row, ready for comparison."""
    spec: CompareSpec
    text: np.ndarray | None = None  # object array of str ("" = missing)
    alt: np.ndarray | None = None  # pinyin: the syllables run together
    number: np.ndarray | None = None  # float64, NaN = missing; dates as YYYYMMDD


def prepare(column: pd.Series, spec: CompareSpec) -> Prepared:
    if spec.method == "numeric":
        number = pd.to_numeric(pd.Series(column.tolist(), dtype=object), errors="coerce").to_numpy(dtype=float)
        return Prepared(spec, number=number)
    if spec.method == "date":
        distinct = {v: _date_int(v) for v in set(column.dropna().tolist())}
        number = np.array([distinct.get(v, -1) if v is not None and v == v else -1 for v in column.tolist()],
                          dtype=float)
        number[number < 0] = np.nan
        return Prepared(spec, number=number)
    if pd.api.types.is_datetime64_any_dtype(column):
        column = column.dt.strftime("%Y-%m-%d")
    # Vectorised: NFKC (full-width letters and digits become ASCII), trimmed, lower case; "" = missing.
    # Arrow's kernels rather than pandas' per-value `str.normalize` (a Python call per row).
    arrow = pa.Array.from_pandas(column.astype("string")).cast(pa.string())
    text = pc.utf8_lower(pc.utf8_trim_whitespace(pc.utf8_normalize(arrow, form="NFKC")))
    texts = text.fill_null("").to_numpy(zero_copy_only=False)
    if spec.method == "pinyin":
        cache = {t: _pinyin(t) for t in set(texts.tolist()) if t}
        spaced = np.array([cache[t] if t else "" for t in texts], dtype=object)
        joined = np.array([s.replace(" ", "") for s in spaced], dtype=object)
        return Prepared(spec, text=spaced, alt=joined)
    return Prepared(spec, text=texts)


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
    assert prepared.text is not None
    a, b = prepared.text[i], prepared.text[j]
    missing = (a == "") | (b == "")
    if spec.method == "exact":
        sim = (a == b).astype(np.float64)
    elif spec.method == "jaro_winkler":
        sim = _cpdist(a, b, JaroWinkler.normalized_similarity)
    elif spec.method == "levenshtein":
        sim = _cpdist(a, b, Levenshtein.normalized_similarity)
    elif spec.method == "token_set":
        sim = _cpdist(a, b, fuzz.token_set_ratio) / 100.0
    elif spec.method == "pinyin":
        assert prepared.alt is not None
        sim = np.maximum(_cpdist(a, b, fuzz.token_sort_ratio) / 100.0,
                         _cpdist(prepared.alt[i], prepared.alt[j], JaroWinkler.normalized_similarity))
    else:  # the loader accepts only METHODS
        raise ValueError(f"unknown comparison method `{spec.method}`")
    sim = np.asarray(sim, dtype=np.float64)
    sim[missing] = np.nan
    return sim


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
