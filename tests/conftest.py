"""Shared fixtures. Service tests skip with a reason on a machine without the servers, but in CI
(CI=true) a missing server is a failure, never a skip."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Prefect keeps its state in a throwaway home, never the user's; no analytics (no network here).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="crmbridge-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# Parallel test runs on 2 cores can take longer than the default 20 s to start the temporary API server.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["CRMBRIDGE_HOME"] = tempfile.mkdtemp(prefix="crmbridge-home-")  # never a user's running server

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
POSTGRES_URL = os.environ.get("CRMBRIDGE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MARIADB_URL = os.environ.get("CRMBRIDGE_TEST_MARIADB", "mysql+pymysql://root@127.0.0.1:3306/test")


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _require_service(name: str, port: int) -> None:
    if _reachable(port):
        return
    message = f"{name} is not reachable on 127.0.0.1:{port}"
    if IN_CI:
        pytest.fail(f"{message}; in CI the service tests must run", pytrace=False)
    pytest.skip(f"{message} (start it to run this test)")


def _fresh_schema_url(base: str, kind: str) -> Iterator[str]:
    """A URL to a schema/database of its own, dropped afterwards, so tests never see each other's tables."""
    import sqlalchemy as sa

    name = f"crmb_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE SCHEMA {name}" if kind == "postgres" else f"CREATE DATABASE {name}"))
    url = sa.engine.make_url(base)
    url = url.update_query_dict({"options": f"-csearch_path={name}"}) if kind == "postgres" else url.set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {name} CASCADE" if kind == "postgres" else f"DROP DATABASE {name}"))
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    _require_service("PostgreSQL", 5432)
    yield from _fresh_schema_url(POSTGRES_URL, "postgres")


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    _require_service("MariaDB", 3306)
    yield from _fresh_schema_url(MARIADB_URL, "mariadb")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db.sqlite'}"


@pytest.fixture(params=["sqlite", "postgres", "mariadb"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """The same test against SQLite, PostgreSQL and MariaDB."""
    return request.getfixturevalue(f"{request.param}_url")


REPO = Path(__file__).resolve().parents[1]
DEMO_MAPPING = REPO / "examples" / "demo" / "mapping.yaml"


def _load_generator():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_demo", REPO / "examples" / "generate_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def demo_project(tmp_path: Path) -> Path:
    """A copy of the demo (mapping + freshly generated, smaller data) in a directory of its own."""
    import shutil

    shutil.copy(DEMO_MAPPING, tmp_path / "mapping.yaml")
    _load_generator().generate(tmp_path, customers=120, contacts=400, partners=60)
    return tmp_path


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """A persistent local Prefect server on a free port (under the session's CRMBRIDGE_HOME), for tests whose
    runs happen in other processes (crmbridge subprocesses, Dask workers); stopped at the end."""
    from crmbridge.flows.prefect_env import start_server, stop_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_server(port)
    try:
        yield server.api_url
    finally:
        stop_server()


# Property-based tests explore new examples on every developer run; in CI they replay a fixed sequence, so a
# submission never fails on an example the change did not cause (a failure found locally is kept in
# .hypothesis/ and replayed until fixed).
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    if IN_CI:
        _hypothesis_settings.load_profile("ci")
except ImportError:  # hypothesis is a dev dependency
    pass
