"""Value transforms: lookup tables (inline or a CSV file), locale-aware numbers, boolean words.

Each produces canonical text ("1234.5", "true") that the field's `type` cast then reads; a value that
cannot be read is refused with a reason code, so it is quarantined rather than loaded wrong.
"""

from __future__ import annotations

import csv
import functools
import re
from pathlib import Path
from typing import Any

import pandas as pd

from crmbridge.mappings.transforms import (
    Checked,
    Rejection,
    by_distinct,
    mapping_dir,
    needs_keys,
    one_of,
    text,
    transform,
)

# --- map ---------------------------------------------------------------------------------------------------


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _is_table(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(_scalar(v) for v in value.values())


def _lookup_path(name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else mapping_dir.get() / path


@functools.lru_cache(maxsize=32)
def _read_lookup(path: Path, mtime: float) -> dict[str, str]:
    """A two-column CSV (UTF-8, a header row): from -> to."""
    del mtime  # part of the cache key: an edited file is read again
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or len(rows[0]) < 2:
        raise ValueError("expected a header row and two columns (from, to)")
    table = {}
    for number, row in enumerate(rows[1:], start=2):
        if len(row) < 2:
            raise ValueError(f"line {number}: expected two columns (from, to); found {len(row)}")
        table[row[0]] = row[1]
    return table


def lookup_table(path: Path) -> dict[str, str]:
    return _read_lookup(path, path.stat().st_mtime)


def _needs_map(argument: Any) -> str | None:
    wrong = needs_keys(argument, {"values": _is_table, "file": lambda v: isinstance(v, str) and v != "",
                                  "ignore_case": lambda v: isinstance(v, bool),
                                  "unmapped": one_of("keep", "null", "reject")},
                       describe="`values` (an inline table) or `file` (a two-column CSV), and optionally "
                       "`ignore_case` and `unmapped` (keep, null or reject)")
    if wrong:
        return wrong
    if "values" not in argument and "file" not in argument:
        return "`values` (an inline table) or `file` (a two-column CSV)"
    if "file" in argument:
        path = _lookup_path(argument["file"])
        try:
            lookup_table(path)
        except OSError as error:
            return f"a readable lookup CSV in `file`; {path}: {error.strerror}"
        except (ValueError, UnicodeDecodeError) as error:
            return f"a lookup CSV of two columns in `file`; {path}: {error}"
    return None


def _table(argument: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    if "file" in argument:
        table.update(lookup_table(_lookup_path(argument["file"])))
    table.update({str(k): v for k, v in (argument.get("values") or {}).items()})
    if argument.get("ignore_case"):
        table = {k.casefold(): v for k, v in table.items()}
    return table


@transform("map", "Translate values through a lookup table: inline `values` and/or a two-column CSV `file`; "
           "`unmapped`: keep (default), null or reject (`unmapped_value`).", True, _needs_map)
def _map(series: pd.Series, argument: dict[str, Any]) -> Checked:
    table = _table(argument)
    fold = argument.get("ignore_case", False)
    unmapped = argument.get("unmapped", "keep")
    values = text(series)
    keys = values.str.strip()
    if fold:
        keys = keys.str.casefold()
    mapped = keys.map(table)  # vectorised hash lookup
    found = keys.isin(list(table)).to_numpy()
    result = mapped.astype(object).where(found, None)
    result = result.map(lambda v: None if v is None else str(v) if not isinstance(v, bool) else str(v).lower())
    rejections = []
    if unmapped == "keep":
        result = result.where(found, values.astype(object))
    elif unmapped == "reject":
        rejections.append(Rejection(values.notna() & ~found, "unmapped_value", "expected a value of the lookup table"))
    return Checked(result.astype(object), rejections)


# --- numbers -----------------------------------------------------------------------------------------------

def _needs_number(argument: Any) -> str | None:
    if argument is None:
        return None
    return needs_keys(argument, {"decimal": one_of(".", ",")})


_HALF = str.maketrans({chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)} | {"\u3000": " "})


def _number_reader(decimal: str):
    thousands = ",'’ \u00a0\u202f" if decimal == "." else ".'’ \u00a0\u202f"
    pattern = re.compile(r"[+-]?\d+(?:[" + re.escape(decimal) + r"]\d+)?", re.ASCII)
    strip = str.maketrans("", "", thousands)

    def read(value: str) -> str | None:
        raw = value.translate(_HALF).strip().replace("\u2212", "-")  # full-width digits from CJK input
        negative = raw.startswith("(") and raw.endswith(")")  # accounting negatives: (1,234.50)
        if negative:
            raw = raw[1:-1].strip()
        for symbol in ("¥", "￥", "$", "€", "£", "CNY", "RMB", "USD", "EUR", "元"):
            raw = raw.replace(symbol, "")
        raw = raw.strip()
        if raw.endswith("-"):  # SAP-style trailing minus: 1.234,50-
            raw, negative = raw[:-1], not negative
        plain = raw.translate(strip)
        if not pattern.fullmatch(plain):
            return None
        plain = plain.replace(decimal, ".")
        if negative:
            plain = plain[1:] if plain.startswith("-") else "-" + plain
        return plain

    return read


@transform("number", "Read a number written with a locale's separators (`decimal: ','` for 1.234,56; default "
           "'.'), currency signs and accounting negatives; gives plain text like 1234.56.", True, _needs_number,
           optional_argument=True)
def _number(series: pd.Series, argument: dict[str, Any] | None) -> Checked:
    decimal = (argument or {}).get("decimal", ".")
    values = text(series)
    out = by_distinct(values, _number_reader(decimal))
    return Checked(out, [Rejection(values.notna() & out.isna() & (values.str.strip() != ""), "invalid_number",
                                   f"expected a number with `{decimal}` as decimal mark")])


# --- booleans ----------------------------------------------------------------------------------------------

# Words for yes and no in the languages legacy exports in this market use: English, Chinese, German,
# French, Spanish, Italian, Dutch, Portuguese, plus the usual marks.
TRUE_WORDS = {"true", "t", "yes", "y", "1", "on", "x", "✓", "✔", "是", "对", "有", "真", "已", "ja", "j", "oui",
              "o", "sí", "si", "s", "vero", "sì", "waar", "sim", "wahr"}
FALSE_WORDS = {"false", "f", "no", "n", "0", "off", "-", "✗", "✘", "否", "不是", "错", "无", "没有", "假", "未",
               "nein", "non", "falso", "nee", "não", "nao", "onwaar", "falsch"}


def _needs_boolean(argument: Any) -> str | None:
    if argument is None:
        return None
    return needs_keys(argument, {"true": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                                 "false": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)})


@transform("boolean", "Read yes/no words in several languages (yes, 是, ja, oui, sí, ...) as true/false; "
           "extra words with `true:`/`false:` lists.", True, _needs_boolean,
           optional_argument=True)
def _boolean(series: pd.Series, argument: dict[str, Any] | None) -> Checked:
    true = TRUE_WORDS | {w.casefold() for w in (argument or {}).get("true", [])}
    false = FALSE_WORDS | {w.casefold() for w in (argument or {}).get("false", [])}
    values = text(series)
    keys = values.str.strip().str.casefold()
    out = pd.Series([None] * len(values), index=values.index, dtype=object)
    out[keys.isin(list(true)).to_numpy()] = "true"
    out[keys.isin(list(false)).to_numpy()] = "false"
    bad = values.notna() & out.isna() & (keys != "")
    return Checked(out, [Rejection(bad, "invalid_boolean", "expected a yes/no word")])
