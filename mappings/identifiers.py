"""Identifier transforms: the Chinese resident identity number, and checksum rules by name.

A checksum rule is a function `valid(text) -> bool` registered under a name with `register_checksum`, or by a
plug-in through the `crmbridge.checksums` entry point group (an entry point that loads such a function; its
name is the entry point's name). The `checksum` transform then refuses values the rule rejects.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import pandas as pd

from crmbridge.mappings.transforms import Checked, Rejection, by_distinct, needs_keys, one_of, text, transform

_HALF_DIGITS = str.maketrans("０１２３４５６７８９ｘＸ", "0123456789XX")

# GB 11643-1999: weights of the first 17 digits, and the check character for the weighted sum modulo 11.
_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"


def cn_resident_id(value: str) -> str | None:
    """The 18-character number (upper-case X) when its check character and birth date are right, else None."""
    number = value.strip().translate(_HALF_DIGITS).replace(" ", "").upper()
    if len(number) != 18 or not number[:17].isdigit() or not (number[17].isdigit() or number[17] == "X"):
        return None
    if _CHECK[sum(int(d) * w for d, w in zip(number[:17], _WEIGHTS, strict=True)) % 11] != number[17]:
        return None
    try:
        born = dt.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return None
    if born.year < 1900 or born > dt.date.today():
        return None
    return number


def _derive(number: str | None, output: str) -> str | None:
    if number is None:
        return None
    if output == "birth_date":
        return f"{number[6:10]}-{number[10:12]}-{number[12:14]}"
    if output == "sex":  # the 17th digit: odd for men, even for women
        return "male" if int(number[16]) % 2 else "female"
    return number


def _needs_id(argument: Any) -> str | None:
    return None if argument is None else needs_keys(argument, {"output": one_of("number", "birth_date", "sex")})


@transform("cn_resident_id", "Check a Chinese resident identity number (18 characters, GB 11643 check "
           "character, real birth date); `output`: number (default), birth_date or sex. Invalid -> `invalid_id`.",
           True, _needs_id, optional_argument=True)
def _cn_resident_id(series: pd.Series, argument: dict[str, Any] | None) -> Checked:
    output = (argument or {}).get("output", "number")
    values = text(series)
    out = by_distinct(values, lambda v: _derive(cn_resident_id(v), output))
    bad = values.notna() & out.isna() & (values.str.strip() != "")
    return Checked(out, [Rejection(bad, "invalid_id", "expected an 18-character resident identity number with "
                                   "a valid check character and birth date")])


# --- checksum rules ----------------------------------------------------------------------------------------

ChecksumRule = Callable[[str], bool]
_CHECKSUMS: dict[str, ChecksumRule] = {}


def register_checksum(name: str) -> Callable[[ChecksumRule], ChecksumRule]:
    def register(fn: ChecksumRule) -> ChecksumRule:
        _CHECKSUMS[name] = fn
        return fn

    return register


def checksums() -> dict[str, ChecksumRule]:
    """Every checksum rule: the built-ins and those of installed plug-ins."""
    for entry in entry_points(group="crmbridge.checksums"):
        if entry.name not in _CHECKSUMS:
            _CHECKSUMS[entry.name] = entry.load()
    return _CHECKSUMS


@register_checksum("luhn")
def luhn(value: str) -> bool:
    """Payment card numbers, IMEI: the Luhn mod-10 check."""
    digits = value.replace(" ", "").replace("-", "")
    if not digits.isdigit() or len(digits) < 2:
        return False
    total = 0
    for position, char in enumerate(reversed(digits)):
        digit = int(char)
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


@register_checksum("cn_resident_id")
def _cn_id_rule(value: str) -> bool:
    return cn_resident_id(value) is not None


@register_checksum("cn_uscc")
def cn_uscc(value: str) -> bool:
    """Unified social credit code of Chinese organisations (GB 32100-2015), 18 characters."""
    alphabet = "0123456789ABCDEFGHJKLMNPQRTUWXY"
    weights = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
    code = value.strip().upper()
    if len(code) != 18 or any(c not in alphabet for c in code):
        return False
    check = 31 - sum(alphabet.index(c) * w for c, w in zip(code[:17], weights, strict=True)) % 31
    return alphabet[0 if check == 31 else check] == code[17]


def _needs_checksum(argument: Any) -> str | None:
    if argument not in checksums():
        return f"the name of a checksum rule ({', '.join(sorted(checksums()))}); found {argument!r}"
    return None


@transform("checksum", "Refuse values a named checksum rule rejects (luhn, cn_resident_id, cn_uscc, or a "
           "plug-in's) -> `invalid_checksum`; valid values pass unchanged.", True, _needs_checksum)
def _checksum(series: pd.Series, argument: str) -> Checked:
    rule = checksums()[argument]
    values = text(series)

    def check(value: str) -> bool:
        try:
            return bool(rule(value.strip()))
        except Exception:  # a plug-in's rule that cannot read a value rejects it
            return False

    ok = by_distinct(values, check)
    bad = values.notna() & ~ok.fillna(True).astype(bool) & (values.str.strip() != "")
    return Checked(values.astype(object), [Rejection(bad, "invalid_checksum", f"expected a value passing the "
                                                     f"`{argument}` check")])
