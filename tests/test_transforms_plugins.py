"""Plug-ins: a transform or a checksum rule from another package's entry point is used by name, checked
when a mapping loads, and its refusals quarantine rows like the built-ins'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest
from transform_helpers import rejected, run

from crmbridge.mappings import identifiers, transforms
from crmbridge.mappings.transforms import Checked, Rejection, Transform


def _vat(series: pd.Series, argument: Any) -> Checked:  # the example of docs/mapping.md
    text = series.astype("string").str.replace(" ", "").str.upper()
    bad = text.notna() & ~text.str.fullmatch(r"[A-Z]{2}[0-9A-Z]{8,12}").fillna(False)
    return Checked(text.astype(object), [Rejection(bad.astype(bool), "invalid_vat", "expected an EU VAT number")])


VAT = Transform("vat_number", _vat, False, "Check an EU VAT number.")


@dataclass
class FakeEntryPoint:
    name: str
    value: Any

    def load(self) -> Any:
        return self.value


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch):
    groups = {"crmbridge.transforms": [FakeEntryPoint("vat_number", VAT)],
              "crmbridge.checksums": [FakeEntryPoint("mod97", lambda v: int(v) % 97 == 1)]}
    monkeypatch.setattr(transforms, "entry_points", lambda group: groups.get(group, []))
    monkeypatch.setattr(identifiers, "entry_points", lambda group: groups.get(group, []))
    monkeypatch.setattr(transforms, "_plugins_loaded", False)
    yield
    transforms._REGISTRY.pop("vat_number", None)
    identifiers._CHECKSUMS.pop("mod97", None)


def test_a_plugin_transform_is_registered_and_refuses_like_a_built_in(plugins) -> None:
    assert "vat_number" in transforms.registry()
    assert run("vat_number", ["de 123456789", None]) == ["DE123456789", None]
    assert rejected("vat_number", ["DE123456789", "12"]) == [(False, ""), (True, "invalid_vat")]


def test_a_plugin_checksum_rule_is_available_by_name(plugins) -> None:
    assert transforms.registry()["checksum"].validate_argument("mod97") is None
    assert rejected("checksum", ["98", "99"], "mod97") == [(False, ""), (True, "invalid_checksum")]
