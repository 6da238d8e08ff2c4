"""Type casts in cleansing: missing values stay missing, bad values are flagged, timestamps land in UTC."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from crmbridge.mappings.cleanse import cast


def test_missing_timestamps_are_missing_not_invalid() -> None:
    values = pd.Series([dt.datetime(2020, 1, 1, 12, 0), None, pd.NaT, float("nan")], dtype=object)
    stamps, invalid = cast(values, "timestamp", "Asia/Shanghai")
    assert invalid.tolist() == [False, False, False, False]
    assert stamps.iloc[0] == pd.Timestamp("2020-01-01 04:00", tz="UTC")
    assert stamps.iloc[1:].isna().all()
    # The same from a datetime64 column (a database DATETIME column with a NULL).
    stamps, invalid = cast(pd.Series([dt.datetime(2020, 1, 1, 12, 0), None]), "timestamp", "Asia/Shanghai")
    assert invalid.tolist() == [False, False] and pd.isna(stamps.iloc[1])


def test_timestamps_naive_aware_bad_and_nanoseconds() -> None:
    values = pd.Series(["2021-03-04 05:06:07", "2021-03-04T05:06:07+02:00", "not a time",
                        pd.Timestamp("2020-01-01 12:00:00.123456789"), "2021-03-28 02:30:00"], dtype=object)
    stamps, invalid = cast(values, "timestamp", "Europe/Berlin")
    assert stamps.iloc[0] == pd.Timestamp("2021-03-04 04:06:07", tz="UTC")
    assert stamps.iloc[1] == pd.Timestamp("2021-03-04 03:06:07", tz="UTC")
    assert stamps.iloc[3] == pd.Timestamp("2020-01-01 11:00:00.123456", tz="UTC")  # truncated to µs
    # unreadable, and a wall-clock time the spring DST change skips
    assert invalid.tolist() == [False, False, True, False, True]


@pytest.mark.parametrize(("kind", "raw", "expected", "bad"), [
    ("integer", ["1", " 2 ", "1,000", "1.5", "x", None], [1, 2, 1000, None, None, None],
     [False, False, False, True, True, False]),
    ("decimal", ["12.50", "1,234.5", "abc", None], ["12.5", "1234.5", None, None], [False, False, True, False]),
    ("boolean", ["yes", "N", "1", "maybe", None], [True, False, True, None, None], [False, False, False, True, False]),
    ("date", ["2024-02-29", "2023-02-29", None], ["2024-02-29", None, None], [False, True, False]),
])
def test_casts(kind: str, raw: list, expected: list, bad: list) -> None:
    values, invalid = cast(pd.Series(raw, dtype=object), kind, None)
    assert [None if pd.isna(v) else v for v in values.tolist()] == expected
    assert invalid.tolist() == bad
