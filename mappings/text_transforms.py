"""Text transforms: name-aware case, full-width to half-width, control characters, regex extraction,
reported truncation, and the multi-column ones (coalesce, concat, template, split).

Templates are parsed with `string.Formatter` and only plain `{column}` names are allowed: no attribute
access, indexing or format specs, so a mapping can never evaluate code.
"""

from __future__ import annotations

import re
import string
from typing import Any

import numpy as np
import pandas as pd

from crmbridge.mappings.transforms import (
    Checked,
    Rejection,
    by_distinct,
    is_count,
    is_text,
    is_text_list,
    needs_keys,
    one_of,
    text,
    transform,
)

# --- case --------------------------------------------------------------------------------------------------

# Particles that stay lower-case inside a name (`Ludwig van Beethoven`, `Oscar de la Hoya`).
_PARTICLES = {"van", "von", "der", "den", "de", "la", "le", "du", "da", "di", "del", "della", "dos", "das",
              "y", "ten", "ter", "zu", "bin", "al"}
_UPPER_WORDS = {"ii", "iii", "iv", "vi", "vii", "viii", "ix", "gmbh", "llc", "ltd.", "plc", "ag", "sa", "bv"}
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)?", re.UNICODE)


def _name_word(word: str, first: bool) -> str:
    lower = word.lower()
    if lower in _PARTICLES and not first:
        return lower
    if lower in _UPPER_WORDS:
        return word.upper()
    for quote in ("'", "’"):  # O'Brien, D’Angelo
        if quote in lower:
            head, tail = lower.split(quote, 1)
            if len(head) <= 2:
                return head.capitalize() + quote + tail.capitalize()
            return head.capitalize() + quote + tail  # don't -> Don't stays usual
    if lower.startswith("mc") and len(lower) > 2:
        return "Mc" + lower[2:].capitalize()
    if lower.startswith("mac") and len(lower) > 5 and lower[3] not in "aeiou":
        return "Mac" + lower[3:].capitalize()
    return lower.capitalize()


def name_case(value: str) -> str:
    """`JOHN MCDONALD` -> `John McDonald`, `ludwig VAN beethoven` -> `Ludwig van Beethoven`."""
    position = [0]

    def fix(match: re.Match[str]) -> str:
        first = position[0] == 0
        position[0] += 1
        return "-".join(_name_word(part, first) for part in match.group(0).split("-"))

    return _WORD.sub(fix, value)


@transform("name_case", "Title-case a person's name, keeping McDonald, O'Brien, van der and III right.")
def _name_case(series: pd.Series, _: Any) -> pd.Series:
    return by_distinct(series, name_case)


# --- characters --------------------------------------------------------------------------------------------

# Full-width ASCII (U+FF01-U+FF5E) and the ideographic space, and nothing else: unlike NFKC this keeps
# ligatures, circled digits and the like as they are.
_HALF = str.maketrans({**{chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}, "\u3000": " "})


@transform("halfwidth", "Turn full-width letters, digits, punctuation and spaces into their half-width forms.")
def _halfwidth(series: pd.Series, _: Any) -> pd.Series:
    return text(series).str.translate(_HALF)


# Control (Cc) and format (Cf: zero-width spaces, BOM, bidi marks) characters; tab and newline become spaces.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\u00ad]")
_LINE = re.compile(r"[\t\r\n]")


@transform("strip_control", "Remove control and invisible format characters (zero-width spaces, BOM); tabs and "
           "line breaks become spaces.")
def _strip_control(series: pd.Series, _: Any) -> pd.Series:
    return text(series).str.replace(_CONTROL, "", regex=True).str.replace(_LINE, " ", regex=True)


# --- regular expressions -----------------------------------------------------------------------------------


def _valid_regex(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _needs_extract(argument: Any) -> str | None:
    wrong = needs_keys(argument, {"pattern": _valid_regex, "group": lambda v: is_count(v) or is_text(v),
                                  "on_no_match": one_of("null", "reject")}, ("pattern",))
    if wrong or not isinstance(argument, dict):
        return wrong
    compiled = re.compile(argument["pattern"])
    group = argument.get("group", 1 if compiled.groups else 0)
    if isinstance(group, int) and group > compiled.groups:
        return f"a `group` the pattern has (it has {compiled.groups})"
    if isinstance(group, str) and group not in compiled.groupindex:
        return f"a `group` the pattern names; found `{group}`"
    return None


@transform("extract", "Keep what a regular expression finds (its first group, or `group`); no match -> missing "
           "(`on_no_match: reject` quarantines it instead).", True, _needs_extract)
def _extract(series: pd.Series, argument: dict[str, Any]) -> Checked:
    compiled = re.compile(argument["pattern"])
    group = argument.get("group", 1 if compiled.groups else 0)

    def find(value: str) -> str | None:
        found = compiled.search(value)
        return found.group(group) if found else None

    values = text(series)
    out = by_distinct(values, find)
    rejections = []
    if argument.get("on_no_match") == "reject":
        rejections.append(Rejection(values.notna() & out.isna(), "pattern_mismatch",
                                    f"expected text matching {argument['pattern']}"))
    return Checked(out, rejections)


# --- length ------------------------------------------------------------------------------------------------


def _needs_truncate(argument: Any) -> str | None:
    if isinstance(argument, bool) or not isinstance(argument, int) or argument < 1:
        return "a positive whole number (the longest value kept, in characters)"
    return None


@transform("truncate", "Cut text to at most N characters; every cut value is reported (`truncated` warning), "
           "never silent.", True, _needs_truncate)
def _truncate(series: pd.Series, argument: int) -> Checked:
    values = text(series)
    cut = values.str.len().fillna(0).to_numpy() > argument
    return Checked(values.str.slice(0, argument),
                   [Rejection(pd.Series(cut, index=values.index), "truncated",
                              f"cut to {argument} characters", "warn")])


# --- several columns ---------------------------------------------------------------------------------------


def _present(series: pd.Series) -> np.ndarray:
    values = text(series)
    return (values.notna() & (values.str.strip() != "")).fillna(False).to_numpy(dtype=bool)


@transform("coalesce", "The first present (non-blank) value among this field's column and the listed columns.",
           True, lambda a: None if is_text_list(a) else "a list of source column names",
           columns=lambda a: list(a) if is_text_list(a) else [])
def _coalesce(series: pd.Series, argument: list[str], others: dict[str, pd.Series]) -> pd.Series:
    out = text(series).astype(object)
    missing = ~_present(out)
    for column in argument:
        if not missing.any():
            break
        candidate = text(others[column]).astype(object)
        take = missing & _present(candidate)
        out[take] = candidate[take]
        missing &= ~take
    return out.where(~missing, None)


def _needs_concat(argument: Any) -> str | None:
    return needs_keys(argument, {"columns": is_text_list, "sep": is_text}, ("columns",))


@transform("concat", "Join this field's value and the listed columns with `sep` (default a space), skipping "
           "missing ones.", True, _needs_concat, columns=lambda a: list(a.get("columns", []))
           if isinstance(a, dict) and is_text_list(a.get("columns")) else [])
def _concat(series: pd.Series, argument: dict[str, Any], others: dict[str, pd.Series]) -> pd.Series:
    sep = argument.get("sep", " ")
    parts = [text(series).astype(object), *(text(others[c]).astype(object) for c in argument["columns"])]
    joined = pd.Series([None] * len(series), index=series.index, dtype=object)
    for part in parts:
        part = part.where(_present(part), None)
        both = joined.notna() & part.notna()
        joined = joined.where(joined.notna(), part)
        joined[both] = joined[both] + sep + part[both]
    return joined


_FORMATTER = string.Formatter()


def template_fields(template: str) -> list[str]:
    """The `{name}`s of a template; raises ValueError for anything but plain names."""
    names = []
    for _, name, spec, conversion in _FORMATTER.parse(template):
        if name is None:
            continue
        if spec or conversion or not re.fullmatch(r"[^\W\d][\w ]*", name) or name in ("",):
            raise ValueError(f"`{{{name}}}`: only plain `{{column}}` names are allowed")
        names.append(name)
    return names


def _needs_template(argument: Any) -> str | None:
    if not isinstance(argument, str):
        return "a text with `{column}` placeholders (`{value}` is this field's own value)"
    try:
        template_fields(argument)
    except ValueError as error:
        return f"a template with plain placeholders; {error}"
    return None


def _template_columns(argument: Any) -> list[str]:
    try:
        return [n for n in template_fields(argument) if n != "value"] if isinstance(argument, str) else []
    except ValueError:
        return []


@transform("template", "Fill a text template: `{value}` is this field's value, `{column}` a source column; a "
           "missing value fills as empty. No code is evaluated.", True, _needs_template, columns=_template_columns)
def _template(series: pd.Series, argument: str, others: dict[str, pd.Series]) -> pd.Series:
    columns = {"value": text(series).astype(object), **{c: text(s).astype(object) for c, s in others.items()}}
    out = pd.Series([""] * len(series), index=series.index, dtype=object)
    for literal, name, _, _ in _FORMATTER.parse(argument):
        out = out + literal
        if name is not None:
            out = out + columns[name].fillna("")
    return out.str.strip()


def _needs_split(argument: Any) -> str | None:
    return needs_keys(argument, {"sep": lambda v: isinstance(v, str) and v != "",
                                 "part": lambda v: isinstance(v, int) and not isinstance(v, bool)}, ("part",))


@transform("split", "Split on `sep` (default: runs of whitespace) and keep part number `part` (0 first, -1 "
           "last); a missing part is missing.", True, _needs_split)
def _split(series: pd.Series, argument: dict[str, Any]) -> pd.Series:
    sep, part = argument.get("sep"), argument["part"]

    def pick(value: str) -> str | None:
        pieces = value.split(sep) if sep else value.split()
        try:
            return pieces[part].strip() or None
        except IndexError:
            return None

    return by_distinct(series, pick)
