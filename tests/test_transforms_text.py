"""Text transforms on messy real-world values: Chinese, accented, full-width, emoji, invisible characters."""

from __future__ import annotations

import pandas as pd
import pytest
from transform_helpers import rejected, run

from crmbridge.mappings import transforms


@pytest.mark.parametrize(("raw", "expected"), [
    ("JOHN MCDONALD", "John McDonald"),
    ("ludwig VAN beethoven", "Ludwig van Beethoven"),
    ("oscar DE LA hoya", "Oscar de la Hoya"),
    ("SEAN O'BRIEN", "Sean O'Brien"),
    ("anne-marie DUPONT-AIGNAN", "Anne-Marie Dupont-Aignan"),
    ("henry viii", "Henry VIII"),
    ("JOSÉ ÁLVAREZ", "José Álvarez"),
    ("ÉMILE ZOLA", "Émile Zola"),
    ("van gogh", "Van Gogh"),  # a particle that starts the name is capitalised
    ("王伟", "王伟"),
    ("ANNA 😀 SMITH", "Anna 😀 Smith"),
])
def test_name_case(raw: str, expected: str) -> None:
    assert run("name_case", [raw]) == [expected]


def test_halfwidth_changes_only_full_width_ascii() -> None:
    assert run("halfwidth", ["ＡＣＭＥ　（上海）有限公司　１２３", "①②", "ﬁ", None]) == \
        ["ACME (上海)有限公司 123", "①②", "ﬁ", None]


def test_strip_control_removes_invisible_characters() -> None:
    assert run("strip_control", ["\ufeffAcme\u200b Ltd\x07", "Li\tWei\r\nBeijing", "张\u200d三", "😀ok"]) == \
        ["Acme Ltd", "Li Wei  Beijing", "张三", "😀ok"]


def test_extract_takes_the_first_group_or_a_named_one() -> None:
    assert run("extract", ["上海市浦东新区 200120", "no code", None], {"pattern": r"(\d{6})"}) == \
        ["200120", None, None]
    assert run("extract", ["ext. 1234"], {"pattern": r"ext\.\s*(?P<ext>\d+)", "group": "ext"}) == ["1234"]


def test_extract_can_reject_a_value_without_a_match() -> None:
    flags = rejected("extract", ["a 200120", "nothing", None], {"pattern": r"\d{6}", "on_no_match": "reject"})
    assert flags == [(False, ""), (True, "pattern_mismatch"), (False, "")]


def test_truncate_cuts_and_warns_for_every_cut_value() -> None:
    result = transforms.apply_checked(pd.Series(["Acme Trading", "Acme", "北京字节跳动科技有限公司", None],
                                                dtype=object), "truncate", 4)
    assert result.values.tolist()[:3] == ["Acme", "Acme", "北京字节"]
    [warning] = result.rejections
    assert warning.severity == "warn" and warning.code == "truncated"
    assert warning.invalid.tolist() == [True, False, True, False]


def test_coalesce_takes_the_first_present_value() -> None:
    assert run("coalesce", [None, "  ", "+86 1", None], ["mobile", "phone"],
               {"mobile": [None, "m2", None, None], "phone": ["p1", "p2", "p3", None]}) == ["p1", "m2", "+86 1", None]


def test_concat_skips_missing_parts() -> None:
    assert run("concat", ["Anna", None, "Li", None], {"columns": ["family"], "sep": " "},
               {"family": ["Smith", "Wang", None, None]}) == ["Anna Smith", "Wang", "Li", None]


def test_template_fills_plain_names_only() -> None:
    assert run("template", ["00042", "7"], "ACC-{value}/{region}", {"region": ["CN", None]}) == \
        ["ACC-00042/CN", "ACC-7/"]
    registry = transforms.registry()["template"]
    assert registry.validate_argument("{value.__class__}") is not None
    assert registry.validate_argument("{value[0]}") is not None
    assert registry.validate_argument("{value!r}") is not None
    assert registry.validate_argument("{value:>10}") is not None
    assert registry.validate_argument("{value}-{other}") is None


def test_split_picks_a_part() -> None:
    assert run("split", ["Shanghai / Pudong", "Beijing", None], {"sep": "/", "part": -1}) == \
        ["Pudong", "Beijing", None]
    assert run("split", ["Anna  Maria Smith"], {"part": 1}) == ["Maria"]
    assert run("split", ["Anna"], {"part": 3}) == [None]


@pytest.mark.parametrize(("name", "argument", "wanted"), [
    ("extract", {"pattern": "("}, "pattern"),
    ("extract", {"pattern": r"(\d)", "group": 2}, "group"),
    ("extract", {"pattern": "x", "oops": 1}, "unknown"),
    ("truncate", 0, "positive"),
    ("truncate", "10", "positive"),
    ("coalesce", "mobile", "list"),
    ("concat", {"sep": " "}, "columns"),
    ("split", {"sep": ""}, "part"),
    ("template", 42, "placeholders"),
])
def test_bad_arguments_are_explained(name: str, argument, wanted: str) -> None:
    message = transforms.registry()[name].validate_argument(argument)
    assert message is not None and wanted in message


def test_collapse_whitespace_means_python_whitespace_on_arrow_strings_too() -> None:
    """Arrow-backed columns take an RE2 pattern (fast); it must match exactly what Python's `\\s` matches, for
    every code point, so a column collapses the same whatever its storage."""
    import re
    import sys

    import pyarrow as pa
    import pyarrow.compute as pc

    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    by_python = [re.fullmatch(r"\s", ch) is not None for ch in chars]
    by_re2 = pc.match_substring_regex(pa.array(chars), f"^{transforms._WHITESPACE_RUN_RE2}$").to_pylist()
    assert by_re2 == by_python
    assert sum(by_python) == 29  # ASCII, U+001C-U+001F, U+0085 and the Unicode separators

    raw = ["  a \u3000 b\t\nc ", "x\xa0\xa0y", "\u2028only\u2029", None, "plain"]
    arrow = transforms.apply(pd.Series(raw, dtype="string[pyarrow]"), "collapse_whitespace", None)
    plain = transforms.apply(pd.Series(raw, dtype=object), "collapse_whitespace", None)
    assert arrow.tolist()[:3] == plain.tolist()[:3] == ["a b c", "x y", "only"]
    assert arrow.tolist()[4] == plain.tolist()[4] == "plain" and pd.isna(arrow.tolist()[3])
