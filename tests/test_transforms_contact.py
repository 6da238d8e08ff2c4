"""Phone numbers, e-mail, countries, postal codes, names and identifiers on messy legacy values."""

from __future__ import annotations

import pandas as pd
import pytest
from transform_helpers import rejected, run

from crmbridge.mappings import identifiers, transforms


def test_phone_numbers_in_e164_national_and_international() -> None:
    values = ["138 0013 8000", "+86 (21) 6234-5678", "０２１-６２３４５６７８", "+1 650-253-0000", "12345",
              "call me", "13800138000.0", None]
    assert run("phone", values, {"region": "CN"}) == [
        "+8613800138000", "+862162345678", "+862162345678", "+16502530000", None, None, None, None]
    assert run("phone", ["13800138000"], {"region": "CN", "format": "national"}) == ["138 0013 8000"]
    assert run("phone", ["6502530000"], {"region": "US", "format": "international"}) == ["+1 650-253-0000"]
    flags = rejected("phone", values, {"region": "CN"})
    assert [f for f, _ in flags] == [False, False, False, False, True, True, True, False]
    assert {c for f, c in flags if f} == {"invalid_phone"}


def test_phone_region_per_row_from_a_country_column() -> None:
    values = ["020 7946 0018", "030 901820", "(650) 253-0000", "138 0013 8000"]
    countries = ["United Kingdom", "Deutschland", "USA", None]
    assert run("phone", values, {"region": "CN", "region_from": "country"}, {"country": countries}) == \
        ["+442079460018", "+4930901820", "+16502530000", "+8613800138000"]


def test_email_syntax_and_normalisation_without_network() -> None:
    values = ["Li.Wei@EXAMPLE.com", " anna@müller.de ", "张三@例子.中国", "bad@", "no at sign", "a@b", "x@localhost",
              "two@@example.com", None]
    result = run("email", values)
    assert result[:3] == ["Li.Wei@example.com", "anna@müller.de", "张三@例子.中国"]
    assert result[3:] == [None] * 6
    assert run("email", ["Li.Wei@EXAMPLE.com"], {"lower": True}) == ["li.wei@example.com"]
    assert {c for f, c in rejected("email", values) if f} == {"invalid_email"}


@pytest.mark.parametrize(("raw", "code"), [
    ("中国", "CN"), ("中华人民共和国", "CN"), ("China", "CN"), ("CHN", "CN"), ("cn", "CN"), ("156", "CN"),
    ("Deutschland", "DE"), ("Germany", "DE"), ("United States", "US"), ("U.S.A.", "US"), ("美国", "US"),
    ("Viet Nam", "VN"), ("Côte d'Ivoire", "CI"), ("  united   kingdom ", "GB"), ("香港", "HK"),
])
def test_country_names_and_codes_become_alpha_2(raw: str, code: str) -> None:
    assert run("country", [raw]) == [code]


def test_unknown_countries_are_rejected() -> None:
    assert rejected("country", ["Narnia", "", None]) == [(True, "invalid_country"), (False, ""), (False, "")]


def test_postal_codes_per_country() -> None:
    assert run("postal_code", ["sw1a1aa", "SW1A 1AA", "12345"], {"country": "GB"}) == ["SW1A 1AA", "SW1A 1AA", None]
    assert run("postal_code", ["200120", "２００１２０", "20012"], {"country": "中国"}) == ["200120", "200120", None]
    values = ["1000001", "10115", "941031234", "K1A0B1", "75008"]
    countries = ["JP", "Germany", "US", "Canada", "Monaco"]  # no pattern for Monaco: kept as written
    assert run("postal_code", values, {"country_from": "country"}, {"country": countries}) == \
        ["100-0001", "10115", "94103-1234", "K1A 0B1", "75008"]
    assert rejected("postal_code", ["1234"], {"country": "DE"}) == [(True, "invalid_postal_code")]


@pytest.mark.parametrize(("raw", "given", "family"), [
    ("王伟", "伟", "王"),
    ("欧阳修", "修", "欧阳"),
    ("诸葛 亮", "亮", "诸葛"),
    ("约翰·史密斯", "约翰", "史密斯"),
    ("Ludwig van Beethoven", "Ludwig", "van Beethoven"),
    ("Smith, John", "John", "Smith"),
    ("José María Álvarez", "José María", "Álvarez"),
    ("Madonna", None, "Madonna"),
    ("John Smith Jr.", "John", "Smith"),
])
def test_name_parts(raw: str, given: str | None, family: str) -> None:
    assert run("name_part", [raw], {"part": "given"}) == [given]
    assert run("name_part", [raw], {"part": "family"}) == [family]


def test_romanised_chinese_names_family_first_when_told() -> None:
    assert run("name_part", ["Wang Xiaoming"], {"part": "family", "order": "eastern"}) == ["Wang"]
    assert run("name_part", ["Wang Xiaoming"], {"part": "family"}) == ["Xiaoming"]


def test_chinese_resident_identity_numbers() -> None:
    values = ["11010519491231002X", "11010519491231002x", "１１０１０５１９４９１２３１００２Ｘ", "110105194912310021",
              "11010519491331002X", "1101051949123100", None]
    assert run("cn_resident_id", values) == ["11010519491231002X"] * 3 + [None] * 4
    assert run("cn_resident_id", values[:1], {"output": "birth_date"}) == ["1949-12-31"]
    assert run("cn_resident_id", values[:1], {"output": "sex"}) == ["female"]
    assert [f for f, _ in rejected("cn_resident_id", values)] == [False] * 3 + [True] * 3 + [False]


def test_checksum_rules_and_registering_one() -> None:
    assert rejected("checksum", ["4111 1111 1111 1111", "4111 1111 1111 1112"], "luhn") == \
        [(False, ""), (True, "invalid_checksum")]
    assert rejected("checksum", ["91350100M000100Y43", "91350100M000100Y44"], "cn_uscc") == \
        [(False, ""), (True, "invalid_checksum")]

    @identifiers.register_checksum("even_digits")
    def even(value: str) -> bool:
        return int(value) % 2 == 0  # raises on non-digits: that rejects the value

    try:
        assert transforms.registry()["checksum"].validate_argument("even_digits") is None
        assert rejected("checksum", ["42", "43", "abc"], "even_digits") == \
            [(False, ""), (True, "invalid_checksum"), (True, "invalid_checksum")]
    finally:
        identifiers._CHECKSUMS.pop("even_digits")
    assert "luhn" in transforms.registry()["checksum"].validate_argument("nope")


@pytest.mark.parametrize(("name", "argument", "wanted"), [
    ("phone", {}, "region"),
    ("phone", {"region": "XX"}, "region"),
    ("phone", {"region": "CN", "format": "rfc3966"}, "format"),
    ("email", {"lower": "yes"}, "lower"),
    ("postal_code", {"country": "Narnia"}, "country"),
    ("postal_code", {"country": "CN", "country_from": "c"}, "exactly one"),
    ("name_part", {"part": "middle"}, "part"),
    ("cn_resident_id", {"output": "age"}, "output"),
])
def test_bad_arguments_are_explained(name: str, argument, wanted: str) -> None:
    message = transforms.registry()[name].validate_argument(argument)
    assert message is not None and wanted in message


def test_per_value_libraries_run_once_per_distinct_value(monkeypatch: pytest.MonkeyPatch) -> None:
    from crmbridge.mappings import contact

    calls: list[str] = []
    real = contact.format_phone
    monkeypatch.setattr(contact, "format_phone", lambda v, r, s="e164": calls.append(v) or real(v, r, s))
    values = pd.Series(["13800138000", "13900139000"] * 5000, dtype=object)
    transforms.apply(values, "phone", {"region": "CN"})
    assert sorted(calls) == ["13800138000", "13900139000"]
