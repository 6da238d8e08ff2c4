"""Blocking keys, declared in the mapping as `field` or `function(field)` (e.g. `soundex(family_name)`).

Candidate pairs are the rows that agree on every key of at least one blocking rule, so comparisons stay far
below n². Keys are computed once per distinct value (names and years repeat a lot) and handed to the matcher
as integer codes, one per row: blocks are found by grouping integers, with no Python string per row and no
string join per rule."""

from __future__ import annotations

import re
from collections.abc import Callable

import jellyfish
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from crmbridge.dedupe.compare import encode, recode

_EXPRESSION = re.compile(r"^\s*(?:(?P<function>[a-z_0-9]+)\(\s*(?P<inner>[A-Za-z_][A-Za-z0-9_]*)\s*\)"
                         r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))\s*$")


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _year(text: str) -> str:
    digits = _digits(text)
    return digits[:4] if len(digits) >= 4 else ""


# Every function maps one non-empty text value to a key text; "" means "no key" (the row joins no block).
FUNCTIONS: dict[str, Callable[[str], str]] = {
    "lower": lambda t: t.strip().lower(),
    "soundex": lambda t: jellyfish.soundex(t) if t.strip() else "",
    "metaphone": lambda t: jellyfish.metaphone(t) if t.strip() else "",
    "nysiis": lambda t: jellyfish.nysiis(t) if t.strip() else "",
    "digits": _digits,
    "last4": lambda t: _digits(t)[-4:] if len(_digits(t)) >= 4 else "",
    "last7": lambda t: _digits(t)[-7:] if len(_digits(t)) >= 7 else "",
    "first3": lambda t: t.strip().lower()[:3],
    "initial": lambda t: t.strip().lower()[:1],
    "year": _year,
    "month_day": lambda t: _digits(t)[4:8] if len(_digits(t)) >= 8 else "",
}


KEY_DATE_TEXT = "%Y%m%d"  # how keys read a date column as text (year() takes its first four digits)


def parse(expression: str) -> tuple[str | None, str]:
    """(function or None, field) of a key expression; ValueError with what was expected otherwise."""
    found = _EXPRESSION.match(expression)
    if not found:
        raise ValueError(f"`{expression}` is not a blocking key; expected `field` or `function(field)`")
    if found["plain"]:
        return None, found["plain"]
    if found["function"] not in FUNCTIONS:
        raise ValueError(f"unknown key function `{found['function']}`; expected one of: "
                         f"{', '.join(sorted(FUNCTIONS))}")
    return found["function"], found["inner"]


def _keys_of_distinct(column: pd.Series, expression: str,
                      memo: dict | None = None) -> tuple[np.ndarray, pa.Array, pa.Array]:
    """(index of each row's value in the distinct values, -1 where missing; the distinct values; the key of
    every distinct value).

    The key is computed once per distinct value: Arrow kernels for a plain field (trimmed, lower case),
    the Python function otherwise. Dates are read as YYYYMMDD."""
    function, _ = parse(expression)
    index, distinct = encode(column, KEY_DATE_TEXT, memo)
    if function is None:
        return index, distinct, pc.utf8_lower(pc.utf8_trim_whitespace(distinct))
    apply = FUNCTIONS[function]
    return index, distinct, pa.array([apply(value) for value in distinct.to_pylist()], pa.large_string())


def codes(frame: pd.DataFrame, expression: str, memo: dict | None = None) -> np.ndarray:
    """A dense integer code per row (equal codes = equal keys); -1 where the field is missing or yields no
    key. `memo`: one dict per frame, so a column or key used by several rules is computed once."""
    if memo is not None and ("key", expression) in memo:
        return memo[("key", expression)]
    result = recode(*_keys_of_distinct(frame[parse(expression)[1]], expression, memo))[0]
    if memo is not None:
        memo[("key", expression)] = result
    return result


def rule_codes(frame: pd.DataFrame, rule: tuple[str, ...], memo: dict | None = None) -> np.ndarray:
    """One dense integer code per row for a blocking rule (its keys combined); -1 when any part is missing."""
    combined = codes(frame, rule[0], memo)
    span = int(combined.max()) + 1 if len(combined) else 0  # combined codes are below span
    for expression in rule[1:]:
        part = codes(frame, expression, memo)
        width = int(part.max()) + 1 if len(part) else 0
        if span * width >= 2**62:  # mixed radix would overflow int64: make the codes so far dense first
            combined, span = _dense(combined)
        combined = np.where((combined >= 0) & (part >= 0), combined * width + part, -1)
        span *= width
    return combined if len(rule) == 1 else _dense(combined)[0]


def _dense(code: np.ndarray) -> tuple[np.ndarray, int]:
    """Codes renumbered 0..k-1 (-1 stays), and k."""
    present = code >= 0
    dense = np.full(len(code), -1, dtype=np.int64)
    dense[present], distinct = pd.factorize(code[present])
    return dense, len(distinct)


def compute(frame: pd.DataFrame, expression: str) -> pd.Series:
    """The key text of every row (NA where the field is missing or yields no key), e.g. to show a key."""
    index, _, key = _keys_of_distinct(frame[parse(expression)[1]], expression)
    texts = np.asarray([*key.to_pylist(), None], dtype=object)
    rows = texts[np.where(index >= 0, index, len(texts) - 1)]
    keys = pd.Series(rows, index=frame.index, dtype="string")
    return keys.mask(keys == "")
