"""Cleansing transforms: vectorised functions over a pandas Series, registered by name.

Each transform takes the column and its argument (None when the step is a bare name) and returns a new
column, or a `Checked` result: the new column plus the values it refused (`Rejection`: a mask, a reason
code and a severity, `reject` -> quarantine, `warn` -> counted and loaded). Missing values stay missing.
A transform that reads other source columns (coalesce, template, a per-row phone region) declares them
through `columns(argument)`; it is then called as `fn(column, argument, others)` with those columns.
Plug-ins register more through the `crmbridge.transforms` entry point group (an entry point that
loads a `Transform`); names are looked up in the registry, never evaluated. A transform that takes an
argument may check it when the mapping is loaded (`validate_argument`), so a bad argument is reported with
its position instead of failing a run.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pandas as pd

TransformFn = Callable[..., "pd.Series | Checked"]

# The mapping file's folder while a mapping is checked or run: lookup files (`map: {file: ...}`) are relative
# to it.
mapping_dir: ContextVar[Path] = ContextVar("crmbridge_mapping_dir", default=Path("."))


@dataclass(frozen=True)
class Rejection:
    """Values a transform refused: `invalid` marks them; `code` is the quarantine reason code."""

    invalid: pd.Series
    code: str
    detail: str
    severity: str = "reject"  # reject: the row goes to quarantine; warn: the row loads, the count is reported


@dataclass
class Checked:
    values: pd.Series
    rejections: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True)
class Transform:
    """A named cleansing step: `fn(column, argument)`, plus what the mapping reference says about it."""

    name: str
    fn: TransformFn
    takes_argument: bool
    summary: str
    validate_argument: Callable[[Any], str | None] | None = None  # returns an error text, or None
    columns: Callable[[Any], list[str]] | None = None  # other source columns the argument names
    optional_argument: bool = False  # may be written as a bare name too (the argument is then None)


_REGISTRY: dict[str, Transform] = {}


def transform(
    name: str,
    summary: str,
    takes_argument: bool = False,
    validate_argument: Callable[[Any], str | None] | None = None,
    columns: Callable[[Any], list[str]] | None = None,
    optional_argument: bool = False,
) -> Callable[[TransformFn], TransformFn]:
    def register(fn: TransformFn) -> TransformFn:
        _REGISTRY[name] = Transform(name, fn, takes_argument, summary, validate_argument, columns,
                                    optional_argument)
        return fn

    return register


def registry() -> dict[str, Transform]:
    """Every transform by name: the built-ins and those of installed plug-ins."""
    _load_builtins()
    _load_plugins()
    return _REGISTRY


def _load_builtins() -> None:
    # The vocabulary lives in modules of its own that register themselves on import.
    from crmbridge.mappings import (  # noqa: F401
        contact,
        dates,
        identifiers,
        text_transforms,
        value_transforms,
    )


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
# The same class in RE2 syntax, for Arrow-backed strings: Python's `\s` (str.isspace) is ASCII whitespace,
# U+001C-U+001F, U+0085 and the Unicode separators (checked code point by code point in the tests). RE2's own
# `\s` is ASCII only, and a compiled pattern would send pandas to Python's `re`, one value at a time (3x slower).
_WHITESPACE_RUN_RE2 = r"[\t\n\x0b\f\r\x1c-\x1f\x85\p{Z}]+"


def _arrow_backed(series: pd.Series) -> bool:
    return getattr(series.dtype, "storage", None) == "pyarrow" or isinstance(series.dtype, pd.ArrowDtype)


@transform("trim", "Remove leading and trailing whitespace.")
def _trim(series: pd.Series, _: Any) -> pd.Series:
    return _text(series).str.strip()


@transform("collapse_whitespace", "Trim, and turn every run of whitespace inside into one space.")
def _collapse(series: pd.Series, _: Any) -> pd.Series:
    text = _text(series)
    pattern = _WHITESPACE_RUN_RE2 if _arrow_backed(text) else _WHITESPACE_RUN
    return text.str.replace(pattern, " ", regex=True).str.strip()


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


def columns_read(name: str, argument: Any) -> list[str]:
    """The other source columns the step `name: argument` reads (empty for most transforms)."""
    found = registry().get(name)
    return list(found.columns(argument)) if found and found.columns else []


def apply_checked(series: pd.Series, name: str, argument: Any,
                  others: Mapping[str, pd.Series] | None = None) -> Checked:
    """Run the transform `name` over a column; the result names the values it refused.

    `others` holds the source columns the step reads besides its own; a column it lacks counts as missing.
    """
    found = registry()[name]
    if found.columns:
        given = dict(others or {})
        for column in found.columns(argument):
            if column not in given:
                given[column] = pd.Series([None] * len(series), index=series.index, dtype=object)
        result = found.fn(series, argument, given)
    else:
        result = found.fn(series, argument)
    return result if isinstance(result, Checked) else Checked(result)


def apply(series: pd.Series, name: str, argument: Any, others: Mapping[str, pd.Series] | None = None) -> pd.Series:
    """Run the transform `name` over a column; refused values become missing."""
    result = apply_checked(series, name, argument, others)
    values = result.values
    for rejection in result.rejections:
        if rejection.severity == "reject" and rejection.invalid.any():
            values = values.astype(object).where(~rejection.invalid.to_numpy(dtype=bool), None)
    return values


# --- helpers the vocabulary modules share --------------------------------------------------------------


def text(series: pd.Series) -> pd.Series:
    """The column as strings (object dtype), keeping missing values missing."""
    return _text(series)


def by_distinct(series: pd.Series, fn: Callable[[str], Any]) -> pd.Series:
    """Apply a per-value function once per distinct present value (legacy columns repeat a lot).

    Missing values stay missing (None). The result has object dtype.
    """
    values = _text(series).astype(object)
    present = values.notna().to_numpy()
    out = pd.Series([None] * len(values), index=values.index, dtype=object)
    if not present.any():
        return out
    codes, uniques = pd.factorize(values[present], sort=False)
    mapped = [fn(u) for u in uniques.tolist()]
    result = pd.Series(mapped, dtype=object).to_numpy()[codes]
    out.iloc[present.nonzero()[0]] = result
    return out


def needs_keys(argument: Any, allowed: dict[str, Callable[[Any], bool]], required: tuple[str, ...] = (),
               describe: str = "") -> str | None:
    """Check an object argument: known keys only, required ones present, each value of the right kind."""
    if not isinstance(argument, dict):
        found = "nothing" if argument is None else f"a {type(argument).__name__}"
        return f"an object with {describe or ', '.join(f'`{k}`' for k in allowed)}; found {found}"
    unknown = [k for k in argument if k not in allowed]
    if unknown:
        return (f"only the keys {', '.join(f'`{k}`' for k in allowed)}; found unknown "
                f"{', '.join(f'`{k}`' for k in unknown)}")
    missing = [k for k in required if k not in argument]
    if missing:
        return f"the key{'s' if len(missing) > 1 else ''} {', '.join(f'`{k}`' for k in missing)}"
    for key, value in argument.items():
        if not allowed[key](value):
            return f"a valid `{key}`; found {value!r}"
    return None


def is_text(value: Any) -> bool:
    return isinstance(value, str)


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_text_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda value: value in choices
