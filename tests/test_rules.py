"""Validation rules and rejecting transforms: each invalid value lands in the quarantine with the right reason,
field, message and (masked) original value; warnings load the row; entity-wide rules see the whole entity;
and every problem in a mapping's vocabulary is reported with its file, line, column and path."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cleanse_project import write_project

from crmbridge.errors import MappingError
from crmbridge.mappings import load_mapping
from crmbridge.mappings.cleanse import cleanse
from crmbridge.staging import Staging


def _batch(mapping, entity_name: str, rows: list[list[str]], columns: list[str]):
    entity = mapping.entity(entity_name)
    frame = pd.DataFrame(rows, columns=columns, dtype=object).replace({"": None})
    return cleanse(mapping, entity, frame, np.arange(2, len(rows) + 2))


ACCOUNT_COLUMNS = ["cust_id", "name", "country", "phone", "vat", "tier"]


def test_each_invalid_value_is_quarantined_with_its_reason_field_message_and_masked_value(tmp_path: Path) -> None:
    mapping = load_mapping(write_project(tmp_path))
    result = _batch(mapping, "accounts", [
        ["A1", "ACME", "CN", "138 0013 8000", "91350100M000100Y43", "gold"],
        ["A3", "Tech", "CN", "12345678", "91350100M000100Y43", "gold"],
        ["A4", "Globex", "Narnia", "+1 650 253 0000", "", "bronze"],
        ["A5", "Initech", "US", "(650) 253-0000", "", "platinum"],
        ["A7", "Bad VAT", "CN", "13800138000", "91350100M000100Y44", "gold"],
        ["A8", None, "DE", "030 901820", "", "gold"],
    ], ACCOUNT_COLUMNS)
    problems = {row: [(p.field, p.code, p.detail, p.value) for p in found]
                for row, found in result.quarantined.items()}
    assert problems == {
        3: [("phone", "invalid_phone", "expected a valid phone number", "•••5678")],  # mask: last4
        4: [("country", "invalid_country", "expected a country name or ISO 3166 code", "Narnia")],
        5: [("tier", "not_in_enum", "expected one of: gold, silver, bronze", "platinum")],
        6: [("vat", "invalid_checksum", "expected a value passing the `cn_uscc` check", "91350100M000100Y44")],
        7: [("name", "required_missing", "a value is required", "")],
    }
    assert result.keys == {3: "A3", 4: "A4", 5: "A5", 6: "A7", 7: "A8"}
    assert result.frame["_key"].tolist() == ["A1"]


def test_warnings_load_the_row_and_are_counted(tmp_path: Path) -> None:
    mapping = load_mapping(write_project(tmp_path))
    result = _batch(mapping, "accounts", [
        ["A1", "ACME", "CN", "13800138000", "", "gold"],      # CN without VAT: a warning
        ["A2", "Globex", "GB", "020 7946 0018", "", "gold"],  # not CN: the rule does not apply
        ["A3", "Tech", "中国", "13800138001", None, "gold"],
    ], ACCOUNT_COLUMNS)
    assert result.quarantined == {}
    assert result.frame["_key"].tolist() == ["A1", "A2", "A3"]
    assert result.warnings == {("vat", "required_missing"): 2}


def _rules_mapping(tmp_path: Path, rules: str, field_type: str = "string", transform: str = "[trim]") -> Path:
    project = write_project(tmp_path)
    text = project.read_text(encoding="utf-8").replace(
        "      tier:\n        from: tier\n        rules:\n          - enum: [gold, silver, bronze]\n",
        f"      tier:\n        from: tier\n        type: {field_type}\n        transform: {transform}\n"
        f"        rules:\n{rules}")
    project.write_text(text, encoding="utf-8")
    return project


@pytest.mark.parametrize(("rules", "field_type", "values", "codes"), [
    ("          - regex: '[A-Z]{2}\\d{2}'\n", "string", ["AB12", "ab12", "AB123", None], ["", "pattern_mismatch",
                                                                                        "pattern_mismatch", ""]),
    ("          - length: {min: 2, max: 3}\n", "string", ["a", "ab", "abc", "abcd"], ["wrong_length", "", "",
                                                                                    "wrong_length"]),
    ("          - range: {min: 0, max: 100}\n", "integer", ["-1", "0", "100", "101"], ["out_of_range", "", "",
                                                                                      "out_of_range"]),
    ("          - range: {min: '2000-01-01'}\n", "date", ["1999-12-31", "2000-01-01", None, "2024-02-29"],
     ["out_of_range", "", "", ""]),
    ("          - enum: [true]\n", "boolean", ["yes", "no", "1", None], ["", "not_in_enum", "", ""]),
    ("          - required: true\n            when: {field: country, in: [DE, GB]}\n", "string",
     [None, None, None, "x"], ["", "required_missing", "required_missing", ""]),
])
def test_row_rules(tmp_path: Path, rules: str, field_type: str, values: list, codes: list[str]) -> None:
    mapping = load_mapping(_rules_mapping(tmp_path, rules, field_type))
    countries = ["CN", "DE", "GB", "DE"]
    rows = [[f"A{i}", "Name", countries[i], "13800138000" if countries[i] == "CN" else "+4930901820", "", value]
            for i, value in enumerate(values)]
    result = _batch(mapping, "accounts", rows, ACCOUNT_COLUMNS)
    found = ["" if i + 2 not in result.quarantined else result.quarantined[i + 2][0].code for i in range(len(values))]
    assert found == codes


def test_a_whole_run_quarantines_with_reasons_and_balances(tmp_path: Path) -> None:
    from crmbridge.flows.migrate import start_run

    mapping = write_project(tmp_path)
    run, result = start_run(mapping)
    totals = {e["entity"]: (e["source"], e["created"], e["quarantined"], e["balanced"]) for e in result["entities"]}
    assert totals == {"accounts": (6, 3, 3, True), "contacts": (7, 2, 5, True)}
    staging = Staging(run.staging_path)
    try:
        frame = staging.quarantine_frame()
    finally:
        staging.close()
    reasons = {(e, k): r for e, k, r in zip(frame.entity, frame.source_key, frame.reason, strict=True)}
    assert reasons == {
        ("accounts", "A3"): "invalid_phone", ("accounts", "A4"): "invalid_country",
        ("accounts", "A5"): "not_in_enum", ("contacts", "C3"): "invalid_email",
        ("contacts", "C4"): "invalid_date", ("contacts", "C5"): "reference_missing",
        ("contacts", "C6"): "not_unique", ("contacts", "C7"): "invalid_id",
    }
    unique = json.loads(frame[frame.source_key == "C6"].problems.iloc[0])
    assert unique == [{"field": "email", "code": "not_unique", "detail": "an earlier row of the entity has the same "
                       "value", "value": "r•••@example.com"}]
    id_problem = json.loads(frame[frame.source_key == "C7"].problems.iloc[0])
    assert id_problem[0]["value"] == "•••"  # mask: full
    with sqlite3.connect(tmp_path / "data" / "crm.db") as conn:
        contacts = conn.execute("SELECT family_name, given_name, email, birthday, id_number FROM contact "
                                "ORDER BY email").fetchall()
        accounts = conn.execute("SELECT name, country, phone FROM account ORDER BY name").fetchall()
    assert contacts == [("欧阳", "修", "ouyang.xiu@example.com", "1980-01-31", "11010519491231002X"),
                        ("McDonald", "Ronald", "ronald@example.com", "1975-02-01", None)]
    assert accounts == [("Acme Trading", "CN", "+8613800138000"), ("McDonald & Sons", "GB", "+442079460018"),
                        ("Umbrella", "DE", "+4930901820")]
    log = run.log_path.read_text(encoding="utf-8")
    assert "field vat: 1 rows required_missing" in log  # the warning, counted
    for secret in ("12345", "not-an-email", "110105194912310021"):
        assert secret not in log


# --- the mapping's problems, each located ---------------------------------------------------------------


def _problems(tmp_path: Path, old: str, new: str) -> list[str]:
    mapping = write_project(tmp_path)
    text = mapping.read_text(encoding="utf-8")
    assert old in text
    mapping.write_text(text.replace(old, new), encoding="utf-8")
    with pytest.raises(MappingError) as failure:
        load_mapping(mapping)
    return [str(p) for p in failure.value.problems]


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("[{phone: {region: CN, region_from: country}}]", "[{phone: {region: CN, style: e164}}]",
     ":31:21 at entities[0].fields.phone.transform[0]: transform `phone` expects only the keys `region`, "
     "`region_from`, `format`; found unknown `style`"),
    ("[{name_part: {part: family}}]", "[{extract: {pattern: '(unclosed'}}]",
     ":57:21 at entities[1].fields.family_name.transform[0]: transform `extract` expects a valid `pattern`"),
    ("[{email: {lower: true}}]", "[{map: {file: lookups/missing.csv}}]",
     ":63:21 at entities[1].fields.email.transform[0]: transform `map` expects a readable lookup CSV in `file`"),
    ("[{date: {order: DMY}}]", "[{date: {order: DMY, formats: ['%d']}}]",
     ":70:21 at entities[1].fields.birthday.transform[0]: transform `date` expects exactly one of `formats` and "
     "`order`"),
    ("          - enum: [gold, silver, bronze]\n", "          - enum: [gold]\n            unique: true\n",
     ":36:13 at entities[0].fields.tier.rules[0]: expected exactly one rule of"),
    ("          - exists_in: accounts\n", "          - exists_in: acounts\n",
     ":54:13 at entities[1].fields.account.rules[0].exists_in: unknown entity `acounts`"),
    ("            when: {field: country, equals: CN}\n", "            when: {field: land, equals: CN}\n",
     ":42:20 at entities[0].fields.vat.rules[0].when.field: unknown field `land`"),
    ("          - unique: true\n", "          - regex: '[a-z'\n",
     ":66:13 at entities[1].fields.email.rules[0].regex: expected a valid regular expression"),
])
def test_problems_are_located(tmp_path: Path, old: str, new: str, expected: str) -> None:
    found = _problems(tmp_path, old, new)
    assert any(expected in p for p in found), found


def test_entities_that_look_each_other_up_are_reported(tmp_path: Path) -> None:
    found = _problems(tmp_path, "          - enum: [gold, silver, bronze]\n", "          - exists_in: contacts\n")
    assert any("tier.rules[0].exists_in: entity `contacts` itself refers to `accounts`" in p for p in found), found


def test_a_range_on_a_text_field_and_an_undeclared_column_are_reported(tmp_path: Path) -> None:
    found = _problems(tmp_path, "          - enum: [gold, silver, bronze]\n", "          - range: {min: 1}\n")
    assert any("tier.rules[0].range: `range` is checked on number, date and timestamp fields" in p for p in found)
    declared = ("    key: cust_id\n    columns: {cust_id: string, name: string, country: string, phone: string, "
                "vat: string, tier: string}\n")
    project = tmp_path / "declared"
    mapping = write_project(project)
    text = mapping.read_text(encoding="utf-8").replace("    key: cust_id\n", declared, 1)
    mapping.write_text(text.replace("transform: [halfwidth, collapse_whitespace, name_case]",
                                    "transform: [{coalesce: [legal_name]}]"), encoding="utf-8")
    with pytest.raises(MappingError) as failure:
        load_mapping(mapping)
    [problem] = [str(p) for p in failure.value.problems]
    assert ":25:21 at entities[0].fields.name.transform[0]: transform `coalesce` reads unknown source column " \
           "`legal_name`; expected one of the declared `columns`" in problem
