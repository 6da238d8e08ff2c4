"""Blocking keys, declared in the mapping as `field` or `function(field)` (e.g. `soundex(family_name)`).

Candidate pairs are the rows that agree on every key of at least one blocking rule, so comparisons stay far
below n². Keys are computed once per distinct value (names and years repeat a lot)."""

from __future__ import annotations

import re
from collections.abc import Callable

import jellyfish
import pandas as pd

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


def _as_text(column: pd.Series) -> pd.Series:
    """Text of every value (NA where missing), vectorised: `str` dtype, dates as YYYYMMDD."""
    if pd.api.types.is_datetime64_any_dtype(column):
        return column.dt.strftime("%Y%m%d").astype("string")
    if not (pd.api.types.is_string_dtype(column) or pd.api.types.is_object_dtype(column)):
        return column.astype("string")
    return column.astype("string")


def _present(keys: pd.Series) -> pd.Series:
    """Keys as a `string` Series with NA where a key is missing or empty (kept columnar: no Python str per row,
    which is what made blocking slow at a million rows)."""
    keys = keys.astype("string")
    return keys.mask(keys == "")


def compute(frame: pd.DataFrame, expression: str) -> pd.Series:
    """The key of every row (NA where the field is missing or yields no key)."""
    function, name = parse(expression)
    text = _as_text(frame[name])
    if function is None:
        keys = text.str.strip().str.lower()
    else:
        apply = FUNCTIONS[function]
        distinct = text.dropna().unique()
        keys = text.map(dict(zip(distinct, map(apply, distinct), strict=True)))
    return _present(keys).set_axis(frame.index)


def rule_key(frame: pd.DataFrame, rule: tuple[str, ...]) -> pd.Series:
    """One text key per row for a blocking rule (its keys joined); NA when any part is missing."""
    parts = [compute(frame, expression) for expression in rule]
    joined = parts[0] if len(parts) == 1 else parts[0].str.cat(parts[1:], sep="\x1f")
    return _present(joined)
