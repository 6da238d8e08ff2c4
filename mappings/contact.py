"""Contact-data transforms: phone numbers (phonenumbers), e-mail addresses (email-validator, no network),
countries (pycountry plus Chinese and common names), postal codes per country, and name parts.

phonenumbers and email-validator work one value at a time; every transform here runs them once per
distinct value (or value and region pair), which is what makes them affordable on millions of rows.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import email_validator
import pandas as pd
import phonenumbers
import pycountry

from crmbridge.mappings.transforms import (
    Checked,
    Rejection,
    by_distinct,
    is_text,
    needs_keys,
    one_of,
    text,
    transform,
)

# --- countries ---------------------------------------------------------------------------------------------

# Names pycountry does not know: Chinese names and the everyday English ones.
_COUNTRY_ALIASES = {
    "中国": "CN", "中华人民共和国": "CN", "中國": "CN", "prc": "CN", "mainland china": "CN", "china mainland": "CN",
    "香港": "HK", "中国香港": "HK", "澳门": "MO", "澳門": "MO", "台湾": "TW", "台灣": "TW", "中国台湾": "TW",
    "美国": "US", "美國": "US", "usa": "US", "u.s.a.": "US", "u.s.": "US", "america": "US",
    "英国": "GB", "英國": "GB", "uk": "GB", "u.k.": "GB", "great britain": "GB", "england": "GB", "britain": "GB",
    "德国": "DE", "deutschland": "DE", "法国": "FR", "日本": "JP", "韩国": "KR", "south korea": "KR", "korea": "KR",
    "新加坡": "SG", "马来西亚": "MY", "泰国": "TH", "越南": "VN", "印度": "IN", "澳大利亚": "AU", "加拿大": "CA",
    "意大利": "IT", "西班牙": "ES", "荷兰": "NL", "holland": "NL", "瑞士": "CH", "schweiz": "CH", "suisse": "CH",
    "俄罗斯": "RU", "russia": "RU", "巴西": "BR", "墨西哥": "MX", "españa": "ES", "italia": "IT", "österreich": "AT",
    "nederland": "NL", "vietnam": "VN", "turkey": "TR", "türkiye": "TR", "czech republic": "CZ",
}


@functools.lru_cache(maxsize=4096)
def country_code(value: str) -> str | None:
    """ISO 3166 alpha-2 code of a country name or code, or None."""
    cleaned = re.sub(r"\s+", " ", value.strip())
    if not cleaned:
        return None
    alias = _COUNTRY_ALIASES.get(cleaned.casefold())
    if alias:
        return alias
    try:
        return pycountry.countries.lookup(cleaned).alpha_2
    except LookupError:
        pass
    if cleaned.isdigit():  # ISO 3166 numeric
        found = pycountry.countries.get(numeric=cleaned.zfill(3))
        return found.alpha_2 if found else None
    return None


@transform("country", "Country names and codes (English, Chinese, alpha-2/3, numeric) -> ISO 3166 alpha-2; "
           "unknown -> `invalid_country`.")
def _country(series: pd.Series, _: Any) -> Checked:
    values = text(series)
    out = by_distinct(values, country_code)
    bad = values.notna() & out.isna() & (values.str.strip() != "")
    return Checked(out, [Rejection(bad, "invalid_country", "expected a country name or ISO 3166 code")])


# --- phone numbers -----------------------------------------------------------------------------------------

_FORMATS = {"e164": phonenumbers.PhoneNumberFormat.E164, "national": phonenumbers.PhoneNumberFormat.NATIONAL,
            "international": phonenumbers.PhoneNumberFormat.INTERNATIONAL}


def _region(value: Any) -> bool:
    return isinstance(value, str) and value.upper() in phonenumbers.SUPPORTED_REGIONS


def _needs_phone(argument: Any) -> str | None:
    wrong = needs_keys(argument, {"region": _region, "region_from": is_text, "format": one_of(*_FORMATS)},
                       describe="`region` (ISO code such as CN), optionally `region_from` (a country column) "
                       "and `format` (e164, national, international)")
    if wrong:
        return wrong
    if "region" not in argument and "region_from" not in argument:
        return "`region` or `region_from`, for numbers written without a country code"
    return None


@functools.lru_cache(maxsize=100_000)  # across batches: legacy exports repeat numbers (one per household, ...)
def format_phone(value: str, region: str | None, style: str = "e164") -> str | None:
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, _FORMATS[style])


@transform("phone", "Validate and format phone numbers (phonenumbers): `region` for numbers without a "
           "country code, or per row from a country column `region_from`; `format`: e164 (default), national, "
           "international. Invalid -> `invalid_phone`.", True, _needs_phone,
           columns=lambda a: [a["region_from"]] if isinstance(a, dict) and isinstance(a.get("region_from"), str)
           else [])
def _phone(series: pd.Series, argument: dict[str, Any], others: dict[str, pd.Series]) -> Checked:
    style = argument.get("format", "e164")
    default = argument.get("region")
    default = default.upper() if default else None
    values = text(series)
    if "region_from" in argument:
        regions = by_distinct(others[argument["region_from"]], country_code).fillna(default or "")
        keys = values + "\x1f" + regions.astype(str)
        out = by_distinct(keys, lambda k: format_phone(k.split("\x1f")[0], k.split("\x1f")[1] or None, style))
    else:
        out = by_distinct(values, lambda v: format_phone(v, default, style))
    bad = values.notna() & out.isna() & (values.str.strip() != "")
    return Checked(out, [Rejection(bad, "invalid_phone", "expected a valid phone number")])


# --- e-mail ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=100_000)
def normalize_email(value: str, lower: bool) -> str | None:
    try:
        found = email_validator.validate_email(value.strip(), check_deliverability=False)
    except (email_validator.EmailNotValidError, ValueError, UnicodeError):
        return None
    return found.normalized.lower() if lower else found.normalized


def _needs_email(argument: Any) -> str | None:
    return None if argument is None else needs_keys(argument, {"lower": lambda v: isinstance(v, bool)})


@transform("email", "Check e-mail syntax and normalise (email-validator; no network): the domain lower-cased "
           "and IDNA-checked, the whole address with `lower: true`. Invalid -> `invalid_email`.", True,
           _needs_email, optional_argument=True)
def _email(series: pd.Series, argument: dict[str, Any] | None) -> Checked:
    lower = bool((argument or {}).get("lower", False))
    values = text(series)
    out = by_distinct(values, lambda v: normalize_email(v, lower))
    bad = values.notna() & out.isna() & (values.str.strip() != "")
    return Checked(out, [Rejection(bad, "invalid_email", "expected an e-mail address (name@domain)")])


# --- postal codes ------------------------------------------------------------------------------------------

# Whole-value patterns after upper-casing and collapsing spaces; the value is returned in this shape.
POSTAL_PATTERNS = {
    "CN": r"\d{6}", "US": r"\d{5}(-\d{4})?", "DE": r"\d{5}", "FR": r"\d{5}", "IT": r"\d{5}", "ES": r"\d{5}",
    "JP": r"\d{3}-\d{4}", "GB": r"[A-Z]{1,2}\d[A-Z\d]? \d[A-Z]{2}", "CA": r"[A-Z]\d[A-Z] \d[A-Z]\d",
    "NL": r"\d{4} [A-Z]{2}", "AU": r"\d{4}", "CH": r"\d{4}", "AT": r"\d{4}", "SG": r"\d{6}", "IN": r"\d{6}",
    "KR": r"\d{5}", "TW": r"\d{3}(\d{2,3})?", "HK": r"", "BR": r"\d{5}-\d{3}", "RU": r"\d{6}", "MX": r"\d{5}",
}
_SPACED = {"GB": 3, "CA": 3, "NL": 2}  # a space before the last N characters
_DASHED = {"JP": 4, "BR": 3}


@functools.lru_cache(maxsize=65536)
def postal_code(value: str, country: str | None) -> str | bool | None:
    """The postal code in its country's usual shape, None when it does not fit; True when the country has
    no known pattern (kept as written)."""
    if not country or country not in POSTAL_PATTERNS:
        return True
    compact = re.sub(r"[\s\-]", "", value.upper().translate(str.maketrans("０１２３４５６７８９", "0123456789")))
    if country in _SPACED and len(compact) > _SPACED[country]:
        compact = compact[: -_SPACED[country]] + " " + compact[-_SPACED[country]:]
    if country in _DASHED and len(compact) > _DASHED[country]:
        compact = compact[: -_DASHED[country]] + "-" + compact[-_DASHED[country]:]
    if country == "US" and len(compact) == 9:
        compact = compact[:5] + "-" + compact[5:]
    return compact if re.fullmatch(POSTAL_PATTERNS[country], compact) else None


def _needs_postal(argument: Any) -> str | None:
    wrong = needs_keys(argument, {"country": lambda v: isinstance(v, str) and country_code(v) is not None,
                                  "country_from": is_text},
                       describe="`country` (a code or name) or `country_from` (a country column)")
    if wrong:
        return wrong
    if ("country" in argument) == ("country_from" in argument):
        return "exactly one of `country` and `country_from`"
    return None


@transform("postal_code", "Check and normalise postal codes for a `country` or per row from `country_from` "
           "(CN, US, GB, DE, JP, ... ; other countries are kept as written). Invalid -> `invalid_postal_code`.",
           True, _needs_postal, columns=lambda a: [a["country_from"]] if isinstance(a, dict)
           and isinstance(a.get("country_from"), str) else [])
def _postal(series: pd.Series, argument: dict[str, Any], others: dict[str, pd.Series]) -> Checked:
    values = text(series).str.strip()
    if "country" in argument:
        countries = pd.Series([country_code(argument["country"])] * len(values), index=values.index, dtype=object)
    else:
        countries = by_distinct(others[argument["country_from"]], country_code)
    keys = values + "\x1f" + countries.fillna("").astype(str)

    def one(key: str) -> Any:
        value, _, country = key.rpartition("\x1f")  # the country code never holds the separator; a value may
        return postal_code(value, country or None)

    found = by_distinct(keys, one)
    kept = found.map(lambda v: v is True).to_numpy(dtype=bool)
    out = found.where(~kept, values).astype(object)
    bad = values.notna() & out.isna() & (values != "")
    return Checked(out.where(out.notna(), None), [Rejection(bad, "invalid_postal_code",
                                                            "expected a postal code of the row's country")])


# --- names -------------------------------------------------------------------------------------------------

# Two-character Chinese family names; every other Chinese name has a one-character family name.
_COMPOUND_SURNAMES = {"欧阳", "司马", "诸葛", "上官", "东方", "皇甫", "尉迟", "公孙", "慕容", "长孙", "宇文",
                      "司徒", "夏侯", "轩辕", "令狐", "端木", "独孤", "南宫", "西门", "澹台", "歐陽", "諸葛"}
_CJK = re.compile(r"^[\u3400-\u9fff\uf900-\ufaff·]+$")
_FAMILY_PARTICLES = {"van", "von", "der", "den", "de", "la", "le", "du", "da", "di", "del", "della", "dos", "ten",
                     "ter", "bin", "al", "mac", "st."}
_SUFFIXES = {"jr", "jr.", "sr", "sr.", "ii", "iii", "iv", "phd", "md"}


def split_name(value: str, order: str = "auto") -> tuple[str | None, str | None]:
    """(given, family) of a full name.

    Chinese names written in Chinese characters are family-name-first (a compound family name such as 欧阳
    takes two characters); `Family, Given` is family-first; otherwise the order decides: `western` (default)
    takes the last word, with particles such as van der, as the family name; `eastern` the first word.
    """
    name = re.sub(r"\s+", " ", value.strip())
    if not name:
        return None, None
    compact = name.replace(" ", "")
    if _CJK.match(compact):
        if "·" in compact:  # transliterated foreign names: 约翰·史密斯 is given·family
            given, _, family = compact.rpartition("·")
            return given or None, family
        size = 2 if compact[:2] in _COMPOUND_SURNAMES and len(compact) > 2 else 1
        return compact[size:] or None, compact[:size]
    if "," in name:
        family, _, given = name.partition(",")
        return given.strip() or None, family.strip() or None
    words = [w for w in name.split(" ") if w.casefold().strip(".") not in _SUFFIXES] or name.split(" ")
    if len(words) == 1:
        return None, words[0]
    if order == "eastern":
        return " ".join(words[1:]), words[0]
    start = len(words) - 1
    while start > 1 and words[start - 1].casefold() in _FAMILY_PARTICLES:
        start -= 1
    return " ".join(words[:start]), " ".join(words[start:])


def _needs_name_part(argument: Any) -> str | None:
    return needs_keys(argument, {"part": one_of("given", "family"), "order": one_of("auto", "western", "eastern")},
                      ("part",))


@transform("name_part", "Split a full name and keep the `given` or `family` part: Chinese names family-first "
           "(欧阳 and other two-character family names included), `Family, Given`, and `order`: western "
           "(default) or eastern for romanised names.", True, _needs_name_part)
def _name_part(series: pd.Series, argument: dict[str, Any]) -> pd.Series:
    index = 0 if argument["part"] == "given" else 1
    order = argument.get("order", "auto")
    return by_distinct(series, lambda v: split_name(v, order)[index])


__all__ = ["country_code", "format_phone", "normalize_email", "postal_code", "split_name"]
