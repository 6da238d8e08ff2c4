"""Lookup tables, locale-aware numbers, boolean words, dates and time zones, on messy legacy values."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from transform_helpers import rejected, run

from crmbridge.mappings import transforms


def test_map_inline_with_case_folding_and_the_three_unmapped_policies() -> None:
    table = {"M": "male", "F": "female", "男": "male", "女": "female"}
    values = ["M", " f ", "男", "x", None]
    assert run("map", values, {"values": table, "ignore_case": True}) == ["male", "female", "male", "x", None]
    assert run("map", values, {"values": table, "unmapped": "null"}) == ["male", None, "male", None, None]
    assert rejected("map", values, {"values": table, "unmapped": "reject"}) == \
        [(False, ""), (True, "unmapped_value"), (False, ""), (True, "unmapped_value"), (False, "")]


def test_map_reads_a_lookup_csv_relative_to_the_mapping(tmp_path: Path) -> None:
    (tmp_path / "lookups").mkdir()
    (tmp_path / "lookups" / "industry.csv").write_text("legacy,crm\n制造业,Manufacturing\nIT,Technology\n",
                                                       encoding="utf-8")
    token = transforms.mapping_dir.set(tmp_path)
    try:
        argument = {"file": "lookups/industry.csv", "values": {"IT": "Information Technology"}}
        assert transforms.registry()["map"].validate_argument(argument) is None
        assert run("map", ["制造业", "IT", "农业"], argument) == ["Manufacturing", "Information Technology", "农业"]
        missing = transforms.registry()["map"].validate_argument({"file": "lookups/nope.csv"})
        assert missing is not None and "nope.csv" in missing
        (tmp_path / "lookups" / "bad.csv").write_text("only\none\n", encoding="utf-8")
        assert "two columns" in transforms.registry()["map"].validate_argument({"file": "lookups/bad.csv"})
    finally:
        transforms.mapping_dir.reset(token)


@pytest.mark.parametrize(("raw", "decimal", "expected"), [
    ("1,234.56", ".", "1234.56"),
    ("1.234,56", ",", "1234.56"),
    ("1 234,56 €", ",", "1234.56"),
    ("¥12,000", ".", "12000"),
    ("(1,234.50)", ".", "-1234.50"),
    ("1.234,50-", ",", "-1234.50"),
    ("−42", ".", "-42"),
    ("1'000'000.5", ".", "1000000.5"),
    ("１２３．５", ".", "123.5"),  # full-width digits from CJK input methods
    ("12abc", ".", None),
    ("1.2.3", ".", None),
])
def test_number(raw: str, decimal: str, expected: str | None) -> None:
    assert run("number", [raw], {"decimal": decimal}) == [expected]
    assert rejected("number", [raw], {"decimal": decimal}) == [(expected is None, "invalid_number" if expected is
                                                                 None else "")]


def test_boolean_words_in_several_languages() -> None:
    values = ["是", "否", "Ja", "NEIN", "oui", "non", "Sí", "x", "✓", "maybe", "", None]
    assert run("boolean", values) == ["true", "false", "true", "false", "true", "false", "true", "true", "true",
                                      None, None, None]
    assert [flag for flag, _ in rejected("boolean", values)] == [False] * 9 + [True, False, False]
    assert run("boolean", ["aktiv", "inaktiv"], {"true": ["aktiv"], "false": ["inaktiv"]}) == ["true", "false"]


def test_date_formats_and_order_never_guess_day_and_month() -> None:
    values = ["03/04/2024", "2024-04-03", "2024年4月3日", "3.4.24", "31/04/2024", "29/02/2023", "29/02/2024",
              "junk", None, "  "]
    dmy = run("date", values, {"order": "DMY"})
    assert dmy == ["2024-04-03", "2024-04-03", "2024-04-03", "2024-04-03", None, None, "2024-02-29", None, None,
                   None]
    mdy = run("date", ["03/04/2024"], {"order": "MDY"})
    assert mdy == ["2024-03-04"]
    flags = rejected("date", values, {"order": "DMY"})
    assert [f for f, _ in flags] == [False, False, False, False, True, True, False, True, False, False]
    assert {code for f, code in flags if f} == {"invalid_date"}


def test_two_digit_years_follow_the_pivot() -> None:
    assert run("date", ["01/02/30", "01/02/31", "01/02/99"], {"formats": ["%d/%m/%y"], "pivot": 30}) == \
        ["2030-02-01", "1931-02-01", "1999-02-01"]


def test_explicit_formats_are_tried_in_order() -> None:
    assert run("date", ["20240105", "05-Jan-2024", "2024/1/5"],
               {"formats": ["%Y%m%d", "%d-%b-%Y", "%Y/%m/%d"]}) == ["2024-01-05"] * 3


def test_timestamps_move_from_the_source_zone_to_the_target_zone() -> None:
    values = ["2024/03/01 08:00", "2024/07/01 08:00", None]
    assert run("timestamp", values, {"formats": ["%Y/%m/%d %H:%M"], "timezone": "Asia/Shanghai"}) == \
        ["2024-03-01T00:00:00+00:00", "2024-07-01T00:00:00+00:00", None]
    assert run("timestamp", values[:2], {"formats": ["%Y/%m/%d %H:%M"], "timezone": "Europe/Berlin",
                                         "to": "America/New_York"}) == \
        ["2024-03-01T02:00:00-05:00", "2024-07-01T02:00:00-04:00"]


def test_times_a_dst_change_skips_or_repeats_are_rejected() -> None:
    values = ["2024-03-31 02:30", "2024-10-27 02:30", "2024-10-27 04:30"]
    flags = rejected("timestamp", values, {"order": "YMD", "timezone": "Europe/Berlin"})
    assert flags == [(True, "invalid_date"), (True, "invalid_date"), (False, "")]


@pytest.mark.parametrize(("name", "argument", "wanted"), [
    ("map", {"values": {"a": "b"}, "unmapped": "drop"}, "unmapped"),
    ("map", {"ignore_case": True}, "values"),
    ("number", {"decimal": ";"}, "decimal"),
    ("boolean", {"true": "yes"}, "true"),
    ("date", {"order": "DMY", "formats": ["%d"]}, "exactly one"),
    ("date", {}, "exactly one"),
    ("date", {"formats": ["no directives"]}, "formats"),
    ("date", {"order": "DYM"}, "order"),
    ("timestamp", {"order": "YMD"}, "timezone"),
    ("timestamp", {"order": "YMD", "timezone": "Mars/Olympus"}, "timezone"),
])
def test_bad_arguments_are_explained(name: str, argument, wanted: str) -> None:
    message = transforms.registry()[name].validate_argument(argument)
    assert message is not None and wanted in message


def test_refused_values_become_missing_through_apply() -> None:
    assert transforms.apply(pd.Series(["31/04/2024"], dtype=object), "date", {"order": "DMY"}).tolist() == [None]
