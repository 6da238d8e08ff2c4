"""Cleansing transforms: vectorised functions over a pandas Series, registered by name.

Each transform takes the column and its argument (None when the step is a bare name) and returns a new
column; missing values stay missing. Plug-ins register more through the `crmbridge.transforms` entry
point group (an entry point that loads a `Transform`); names are looked up in the registry, never
evaluated. A transform that takes an argument may check it when the mapping is loaded
(`validate_argument`), so a bad argument is reported with its position instead of failing a run.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import pandas as pd

TransformFn = Callable[[pd.Series, Any], pd.Series]


@dataclass(frozen=True)
class Transform:
    """A named cleansing step: `fn(column, argument)`, plus what the mapping reference says about it."""

    name: str
    fn: TransformFn
    takes_argument: bool
    summary: str
    validate_argument: Callable[[Any], str | None] | None = None  # returns an error text, or None


_REGISTRY: dict[str, Transform] = {}


def transform(
    name: str,
    summary: str,
    takes_argument: bool = False,
    validate_argument: Callable[[Any], str | None] | None = None,
) -> Callable[[TransformFn], TransformFn]:
    def register(fn: TransformFn) -> TransformFn:
        _REGISTRY[name] = Transform(name, fn, takes_argument, summary, validate_argument)
        return fn

    return register


def registry() -> dict[str, Transform]:
    """Every transform by name: the built-ins and those of installed plug-ins."""
    _load_plugins()
    return _REGISTRY


_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for entry in entry_points(group="crmbridge.transforms"):
        loaded = entry.load()
        if isinstance(loaded, Transform):
            _REGISTRY[loaded.name] = loaded


def _text(series: pd.Series) -> pd.Series:
    """The column as strings, keeping missing values missing."""
    if pd.api.types.is_string_dtype(series.dtype) and not pd.api.types.is_object_dtype(series.dtype):
        return series
    return series.astype("str").where(series.notna())


_WHITESPACE_RUN = re.compile(r"\s+")


@transform("trim", "Remove leading and trailing whitespace.")
def _trim(series: pd.Series, _: Any) -> pd.Series:
    return _text(series).str.strip()


@transform("collapse_whitespace", "Trim, and turn every run of whitespace inside into one space.")
def _collapse(series: pd.Series, _: Any) -> pd.Series:
    return _text(series).str.replace(_WHITESPACE_RUN, " ", regex=True).str.strip()


@transform("lower", "Lower-case.")
def _lower(series: pd.Series, _: Any) -> pd.Series:
    return _text(series).str.lower()


@transform("upper", "Upper-case.")
def _upper(series: pd.Series, _: Any) -> pd.Series:
    return _text(series).str.upper()


@transform("title", "Title-case each word (`ACME trading co` -> `Acme Trading Co`).")
def _title(series: pd.Series, _: Any) -> pd.Series:
    return _text(series).str.title()


@transform("nfkc", "Unicode NFKC normalisation: full-width letters, digits and spaces become half-width.")
def _nfkc(series: pd.Series, _: Any) -> pd.Series:
    return _text(series).map(lambda v: unicodedata.normalize("NFKC", v) if isinstance(v, str) else v)


@transform("digits_only", "Keep only the digits, plus a leading `+` (for phone numbers).")
def _digits_only(series: pd.Series, _: Any) -> pd.Series:
    text = _text(series).str.strip()
    plus = text.str.startswith("+").fillna(False)
    digits = text.str.replace(r"\D", "", regex=True)
    return digits.where(~plus, "+" + digits)


@transform("null_if_empty", "Turn empty or whitespace-only text into a missing value.")
def _null_if_empty(series: pd.Series, _: Any) -> pd.Series:
    text = _text(series)
    return text.where(text.str.strip().fillna("") != "")


def _needs_scalar(argument: Any) -> str | None:
    if isinstance(argument, (str, int, float, bool)):
        return None
    found = "nothing" if argument is None else f"a {type(argument).__name__}"
    return f"a text, number or boolean as its argument; found {found}"


@transform("default", "Use the argument where the value is missing or blank.", True, _needs_scalar)
def _default(series: pd.Series, argument: Any) -> pd.Series:
    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        text = _text(series)
        empty = text.isna() | (text.str.strip() == "")
        return text.where(~empty, str(argument))
    return series.fillna(argument)


def _needs_replace(argument: Any) -> str | None:
    wanted = "an object with `pattern` (a regular expression) and `with` (the replacement text)"
    if not isinstance(argument, dict):
        return wanted
    if set(argument) != {"pattern", "with"}:
        keys = ", ".join(f"`{k}`" for k in argument) or "none"
        return f"{wanted}; found keys: {keys}"
    pattern, replacement = argument["pattern"], argument["with"]
    if not isinstance(pattern, str):
        return "a text in `pattern` (a regular expression)"
    if isinstance(replacement, bool) or not isinstance(replacement, (str, int, float)):
        return "a text in `with` (write `with: ''` to delete the matches)"
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        return f"a valid regular expression in `pattern` ({error})"
    try:
        compiled.sub(str(replacement), "")  # checks group references (\1, \g<name>) in `with`
    except (re.error, IndexError) as error:
        return f"a valid replacement in `with` ({error})"
    return None


@transform(
    "replace",
    "Replace every match of a regular expression; `with` may use groups (`\\1`).",
    True,
    _needs_replace,
)
def _replace(series: pd.Series, argument: Any) -> pd.Series:
    return _text(series).str.replace(argument["pattern"], str(argument["with"]), regex=True)


def apply(series: pd.Series, name: str, argument: Any) -> pd.Series:
    """Run the transform `name` over a column."""
    return registry()[name].fn(series, argument)
