"""Property-based: no transform crashes on arbitrary text. Each returns a column of the same length holding
text or missing values, and every refusal is a clear rejection (a known reason code and a message)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmbridge.mappings import transforms

# One representative argument per transform (every built-in must be listed: a new one without a case fails).
CASES = {
    "trim": None, "collapse_whitespace": None, "lower": None, "upper": None, "title": None, "nfkc": None,
    "digits_only": None, "null_if_empty": None, "default": "unknown",
    "replace": {"pattern": r"(\w+), (\w+)", "with": r"\2 \1"},
    "name_case": None, "halfwidth": None, "strip_control": None,
    "extract": {"pattern": r"(\d{3,})", "on_no_match": "reject"}, "truncate": 5,
    "coalesce": ["other"], "concat": {"columns": ["other"], "sep": "-"}, "template": "{value}/{other}",
    "split": {"sep": ",", "part": 1},
    "map": {"values": {"a": "b", "是": "yes"}, "ignore_case": True, "unmapped": "reject"},
    "number": {"decimal": ","}, "boolean": None,
    "date": {"order": "DMY", "pivot": 30}, "timestamp": {"order": "YMD", "timezone": "Europe/Berlin"},
    "phone": {"region": "CN", "region_from": "other"}, "email": {"lower": True}, "country": None,
    "postal_code": {"country_from": "other"}, "name_part": {"part": "given"}, "cn_resident_id": None,
    "checksum": "luhn",
}

# Text as legacy systems produce it: any Unicode (emoji, CJK, combining marks, controls, surrogates excluded as
# UTF-8 cannot hold them), plus shapes that look almost valid.
LEGACY_TEXT = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.integers(min_value=-10**15, max_value=10**15),  # numbers from a database or a spreadsheet
    st.floats(allow_infinity=True, allow_nan=True),
    st.text(alphabet="0123456789+-()/. 年月日:", max_size=25),
    st.sampled_from(["", " ", "\u3000", "0", "31/02/2024", "2024-10-27 02:30", "+86 138 0013 8000", "a@b.c",
                     "11010519491231002X", "中国", "欧阳修", "１２３", "😀", "\x00", "NaN", "None", "null"]),
)


def test_every_built_in_transform_has_a_case() -> None:
    builtins = {name for name, t in transforms.registry().items() if t.fn.__module__.startswith("crmbridge.")}
    assert builtins == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(LEGACY_TEXT, min_size=1, max_size=8), other=LEGACY_TEXT)
def test_no_transform_crashes_on_arbitrary_text(name: str, values: list, other) -> None:
    argument = CASES[name]
    token = transforms.mapping_dir.set(Path("."))
    try:
        assert transforms.registry()[name].validate_argument is None or \
            transforms.registry()[name].validate_argument(argument) is None
        series = pd.Series(values, dtype=object)
        others = {"other": pd.Series([other] * len(values), dtype=object)}
        result = transforms.apply_checked(series, name, argument, others)
    finally:
        transforms.mapping_dir.reset(token)
    assert len(result.values) == len(values)
    for value in result.values.tolist():
        assert value is None or isinstance(value, str) or pd.isna(value), f"{name} gave {value!r}"
    for rejection in result.rejections:
        assert rejection.code and rejection.detail and rejection.severity in ("reject", "warn")
        assert len(rejection.invalid) == len(values)
        flags = rejection.invalid.tolist()
        assert all(isinstance(f, bool) for f in flags)
        # A missing input is never refused: `required` decides about missing values.
        assert not any(f and v is None for f, v in zip(flags, values, strict=True))
