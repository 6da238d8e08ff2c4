"""pytest fixtures for the emulator. Use them with `from emulators.salesforce.fixture import *  # noqa`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from simple_salesforce import Salesforce

from . import Emulator, start_emulator

__all__ = ["salesforce_client", "salesforce_emulator", "salesforce_env"]


@pytest.fixture
def salesforce_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    """A fresh, empty emulator per test (instance_url, session_id, ca_path, stop, store)."""
    emulator = start_emulator(tmp_path_factory.mktemp("sf-emulator"))
    yield emulator
    emulator.stop()


@pytest.fixture
def salesforce_env(salesforce_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Emulator:
    """The emulator's address, session and CA in SF_INSTANCE_URL / SF_SESSION_ID / SF_CA_BUNDLE."""
    monkeypatch.setenv("SF_INSTANCE_URL", salesforce_emulator.instance_url)
    monkeypatch.setenv("SF_SESSION_ID", salesforce_emulator.session_id)
    monkeypatch.setenv("SF_CA_BUNDLE", salesforce_emulator.ca_path)
    return salesforce_emulator


@pytest.fixture
def salesforce_client(salesforce_emulator: Emulator) -> Salesforce:
    """The real simple-salesforce client, logged in to the emulator by session id."""
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE is set on these machines; trust the emulator's CA only
    session.verify = salesforce_emulator.ca_path
    return Salesforce(session_id=salesforce_emulator.session_id, instance_url=salesforce_emulator.instance_url,
                      session=session, version="59.0")
