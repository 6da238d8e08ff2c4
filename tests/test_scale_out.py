"""Scale-out: the batch stages run on a local Dask cluster of two worker processes through Prefect's Dask
task runner, and the result is the one a single process gives: same reconciliation, same target rows."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import DEMO_MAPPING, _load_generator
from prefect.settings import PREFECT_API_URL, temporary_settings

from crmbridge.flows.migrate import start_run

pytest.importorskip("prefect_dask", reason="scale-out needs prefect-dask (pip install 'crmbridge[dask]')")
pytestmark = pytest.mark.prefect


def _project(where: Path) -> Path:
    where.mkdir()
    shutil.copy(DEMO_MAPPING, where / "mapping.yaml")
    _load_generator().generate(where, customers=600, contacts=1500, partners=120)
    return where


def _target(project: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(project / "data" / "target_crm.db") as con:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("account", "contact")}


def test_a_dask_run_equals_the_single_process_run(tmp_path: Path, prefect_server: str) -> None:
    single, distributed = _project(tmp_path / "single"), _project(tmp_path / "dask")
    for project in (single, distributed):  # small batches: many in flight at once
        mapping = project / "mapping.yaml"
        text = mapping.read_text(encoding="utf-8")
        assert "batch_size: 500\n" in text
        mapping.write_text(text.replace("batch_size: 500\n", "batch_size: 150\n", 1), encoding="utf-8")
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):  # one the workers can reach
        _, expected = start_run(single / "mapping.yaml")
        _, got = start_run(distributed / "mapping.yaml", dask="local:2")
    assert got["entities"] == expected["entities"]
    assert all(e["balanced"] for e in got["entities"])
    assert _target(distributed) == _target(single)
    assert len(_target(single)["contact"]) > 1000
