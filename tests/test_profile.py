"""`crmbridge profile`: per-field statistics before and after cleansing, refusals per rule, masked values, and a
self-contained HTML report."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from cleanse_project import write_project
from typer.testing import CliRunner

from crmbridge.cli.main import app
from crmbridge.flows.profile import profile_mapping, shapes
from crmbridge.mappings import load_mapping


def test_shapes_keep_the_form_and_drop_the_value() -> None:
    values = pd.Series(["138-0013-8000", "王伟", "SW1A 1AA", "Ab😀", "x" * 40])
    assert shapes(values).tolist() == ["999-9999-9999", "汉汉", "AA9A 9AA", "Aa~", "a" * 24 + "…"]


def test_profile_before_and_after_with_refusals_per_rule(tmp_path: Path) -> None:
    mapping = load_mapping(write_project(tmp_path))
    accounts, contacts = profile_mapping(mapping, mapping.load_order())
    assert (accounts.rows, accounts.quarantined_rows) == (6, 3)
    assert dict(accounts.refused) == {("phone", "invalid_phone"): 1, ("country", "invalid_country"): 1,
                                      ("tier", "not_in_enum"): 1}
    assert dict(accounts.warned) == {("vat", "required_missing"): 1}
    before, after = accounts.before["country"], accounts.after["country"]
    assert (before.distinct, after.distinct) == (6, 3)  # 中国 and CN become one code
    assert after.top() == [("CN", 1), ("GB", 1), ("DE", 1)]
    assert accounts.before["vat"].missing_rate == 5 / 6
    # masked fields: top values masked, patterns only
    assert all(v.startswith("•••") for v, _ in accounts.before["phone"].top())
    assert ("999 9999 9999", 2) in accounts.before["phone"].top_patterns()
    # whole-entity rules are counted too: the same quarantine as a run (see test_rules)
    assert dict(contacts.refused) == {("email", "invalid_email"): 1, ("birthday", "invalid_date"): 1,
                                      ("id_number", "invalid_id"): 1, ("email", "not_unique"): 1,
                                      ("account", "reference_missing"): 1}
    assert contacts.quarantined_rows == 5


def test_profile_command_prints_tables_and_writes_self_contained_html(tmp_path: Path) -> None:
    mapping = write_project(tmp_path)
    report = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["profile", str(mapping), "--html", str(report), "--rows", "100"])
    assert result.exit_code == 0, result.output
    assert "accounts" in result.output and "would be quarantined" in result.output
    assert "invalid_phone" in result.output and "warn, loaded" in result.output
    page = report.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") >= 4
    assert not re.search(r"<script|<link|src=|https?://", page)  # nothing loaded from elsewhere
    for secret in ("13800138000", "138 0013 8000", "11010519491231002X", "Ouyang.Xiu@Example.COM"):
        assert secret not in page and secret not in result.output
    assert "欧阳" in page  # an unmasked field's values are shown
    unknown = CliRunner().invoke(app, ["profile", str(mapping), "--entity", "nope"])
    assert unknown.exit_code == 2 and "no entity `nope`" in unknown.output
