"""The flow against real server targets: the `init` project loads into PostgreSQL and MariaDB, creates
its table, and a second run finds every row unchanged (dates and text compare equal across dialects)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from crmbridge.cli.main import app
from crmbridge.flows.migrate import start_run

pytestmark = pytest.mark.prefect


@pytest.mark.parametrize("server", ["postgres", "mariadb"])
def test_init_project_migrates_into_a_server_and_is_idempotent(
    server: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = request.getfixturevalue(f"{server}_url")
    project = tmp_path / "project"
    assert CliRunner().invoke(app, ["init", str(project)]).exit_code == 0
    monkeypatch.setenv("CRM_DB_URL", url)

    _, first = start_run(project / "mapping.yaml")
    row = first["entities"][0]
    assert (row["source"], row["created"], row["quarantined"], row["balanced"]) == (4, 2, 2, True)

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT name, email, phone, customer_since FROM customer ORDER BY name"))
            loaded = [tuple(map(str, r)) for r in rows]
    finally:
        engine.dispose()
    assert loaded == [
        ("Ada Lovelace", "ada.lovelace@example.com", "5550100001", "1998-03-01"),
        ("Grace Hopper", "grace@example.org", "5550100002", "2001-07-15"),
    ]

    _, second = start_run(project / "mapping.yaml")
    row = second["entities"][0]
    assert (row["created"], row["updated"], row["unchanged"], row["quarantined"]) == (0, 0, 2, 2)
