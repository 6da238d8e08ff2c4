"""Date and time transforms: several input formats per field, explicit day/month order, two-digit years
with a stated pivot, time zones, and impossible dates (31 April, 29 February 2023) refused.

Vectorised: each format is tried with `pd.to_datetime(format=...)` on the values no earlier format read,
once per distinct value.
"""

from __future__ import annotations

import zoneinfo
from typing import Any

import numpy as np
import pandas as pd

from crmbridge.mappings.transforms import Checked, Rejection, needs_keys, one_of, text, transform

ORDERS = ("DMY", "MDY", "YMD")
_SEPARATORS = ("/", ".", "-", " ")


def formats_for(order: str) -> list[str]:
    """The usual spellings of a date in the given day/month order, ISO and Chinese forms always included."""
    found = ["%Y-%m-%d", "%Y%m%d", "%Y年%m月%d日", "%Y/%m/%d", "%Y.%m.%d"]
    parts = {"DMY": ("%d", "%m"), "MDY": ("%m", "%d"), "YMD": None}[order]
    if parts:
        for year in ("%Y", "%y"):
            for sep in _SEPARATORS:
                found.append(sep.join((*parts, year)))
        first = parts[0]
        found += [f"{first} %b %Y", f"{first} %B %Y"] if first == "%d" else ["%b %d %Y", "%B %d %Y", "%b %d, %Y",
                                                                              "%B %d, %Y"]
    else:
        found += ["%y-%m-%d", "%y/%m/%d"]
    return found


def _valid_formats(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and "%" in v for v in value)


def _valid_zone(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _pivot(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 99


_DATE_KEYS = {"formats": _valid_formats, "order": one_of(*ORDERS), "pivot": _pivot}


def _needs_date(argument: Any) -> str | None:
    wrong = needs_keys(argument, _DATE_KEYS, describe="`formats` (a list of strptime formats) or `order` "
                       "(DMY, MDY or YMD), and optionally `pivot` (two-digit years up to it are 20xx)")
    if wrong:
        return wrong
    if ("formats" in argument) == ("order" in argument):
        return "exactly one of `formats` and `order` (so day and month are never guessed)"
    return None


def parse_dates(series: pd.Series, argument: dict[str, Any]) -> tuple[pd.Series, pd.Series]:
    """Datetimes (naive) and a mask of present values no format read."""
    formats = argument.get("formats") or formats_for(argument["order"])
    pivot = argument.get("pivot", 68)
    values = text(series).str.strip()
    present = (values.notna() & (values != "")).to_numpy()
    result = pd.Series(pd.NaT, index=values.index, dtype="datetime64[us]")  # years 1-9999, unlike ns
    if not present.any():
        return result, pd.Series(False, index=values.index)
    codes, uniques = pd.factorize(values[present], sort=False)
    distinct = pd.Series(uniques, dtype=object)
    parsed = pd.Series(pd.NaT, index=distinct.index, dtype="datetime64[us]")
    todo = np.ones(len(distinct), dtype=bool)
    for fmt in formats:
        if not todo.any():
            break
        attempt = pd.to_datetime(distinct[todo], format=fmt, errors="coerce")
        if "%y" in fmt:  # the stated pivot, not strptime's 68
            yy = attempt.dt.year % 100
            wanted = np.where(yy <= pivot, 2000 + yy, 1900 + yy)
            shift = (wanted - attempt.dt.year).fillna(0).astype(int)
            if shift.any():
                frame = pd.DataFrame({"year": attempt.dt.year + shift, "month": attempt.dt.month,
                                      "day": attempt.dt.day, "hour": attempt.dt.hour,
                                      "minute": attempt.dt.minute, "second": attempt.dt.second})
                attempt = pd.to_datetime(frame, errors="coerce")
        attempt = attempt.astype("datetime64[us]")
        attempt = attempt.where((attempt.dt.year >= 1) & (attempt.dt.year <= 9999))  # `-3557...` is no year
        read = attempt.notna().to_numpy()
        where = np.flatnonzero(todo)[read]
        parsed.iloc[where] = attempt[read].to_numpy()
        todo[where] = False
    result.iloc[np.flatnonzero(present)] = parsed.to_numpy()[codes]
    invalid = pd.Series(False, index=values.index)
    invalid.iloc[np.flatnonzero(present)] = todo[codes]
    return result, invalid


@transform("date", "Read dates in the listed `formats` (strptime codes), or the usual spellings of an `order` "
           "(DMY, MDY, YMD); gives YYYY-MM-DD. `pivot`: two-digit years up to it are 20xx (default 68). "
           "Unreadable or impossible dates -> `invalid_date`.", True, _needs_date)
def _date(series: pd.Series, argument: dict[str, Any]) -> Checked:
    parsed, invalid = parse_dates(series, argument)
    out = parsed.dt.strftime("%Y-%m-%d").astype(object).where(parsed.notna(), None)
    return Checked(out, [Rejection(invalid, "invalid_date", _expected(argument))])


def _expected(argument: dict[str, Any]) -> str:
    if "formats" in argument:
        return "expected a date in one of the formats " + ", ".join(argument["formats"])
    return f"expected a date in {argument['order']} order"


def _needs_timestamp(argument: Any) -> str | None:
    wrong = needs_keys(argument, {**_DATE_KEYS, "timezone": _valid_zone, "to": _valid_zone},
                       ("timezone",), describe="`formats` or `order`, `timezone` (the zone the values were "
                       "written in) and optionally `to` (default UTC) and `pivot`")
    if wrong:
        return wrong
    if ("formats" in argument) == ("order" in argument):
        return "exactly one of `formats` and `order` (so day and month are never guessed)"
    return None


@transform("timestamp", "Read date-times in `formats` (or an `order`), written in `timezone`, and give ISO 8601 "
           "in the `to` zone (default UTC). Times a DST change skips or repeats are refused (`invalid_date`).",
           True, _needs_timestamp)
def _timestamp(series: pd.Series, argument: dict[str, Any]) -> Checked:
    if "order" in argument:  # with times: each date spelling followed by the usual time spellings
        dates = formats_for(argument["order"])
        times = [" %H:%M:%S", " %H:%M", "T%H:%M:%S", ""]
        argument = {**argument, "formats": [d + t for d in dates for t in times]}
        del argument["order"]
    parsed, invalid = parse_dates(series, argument)
    local = pd.DatetimeIndex(parsed).tz_localize(argument["timezone"], ambiguous="NaT", nonexistent="NaT")
    skipped = pd.Series(local.isna(), index=series.index) & parsed.notna()
    converted = local.tz_convert(argument.get("to", "UTC"))
    out = pd.Series(converted.strftime("%Y-%m-%dT%H:%M:%S%z"), index=series.index, dtype=object)
    out = out.str.replace(r"(\d\d)(\d\d)$", r"\1:\2", regex=True).where(~pd.isna(converted), None)
    return Checked(out.astype(object), [Rejection(invalid | skipped, "invalid_date", _expected(argument))])
