"""`crmbridge sandbox salesforce` (clearly an emulator) and `crmbridge validate` checking a Salesforce target."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import requests
from emulators.salesforce.fixture import *  # noqa: F403 (fixtures)
from typer.testing import CliRunner

from crmbridge.cli.main import app

ROOT = Path(__file__).resolve().parents[1]


def test_sandbox_serves_the_emulator_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SF_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "crmbridge.cli.main", "sandbox", "salesforce", "--port", "0", "--seconds", "60",
         "--directory", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        env_file = tmp_path / "sandbox.env"
        deadline = time.monotonic() + 30
        while not env_file.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        settings = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        session = requests.Session()
        session.trust_env = False
        session.verify = settings["SF_CA_BUNDLE"]
        answer = session.get(settings["SF_INSTANCE_URL"] + "/services/data/v59.0/sobjects/Contact/describe",
                             headers={"Authorization": f"Bearer {settings['SF_SESSION_ID']}"})
        assert answer.status_code == 200 and answer.json()["name"] == "Contact"
    finally:
        process.terminate()
        output = process.communicate(timeout=10)[0]
    assert "EMULATOR" in output and "not Salesforce" in output


def test_validate_checks_the_mapping_against_describe(tmp_path: Path, salesforce_env) -> None:
    (tmp_path / "data.csv").write_text("id,name\n1,Acme\n")
    mapping = """
version: 1
name: check-target
sources:
  files: {type: csv, path: data.csv}
targets:
  sf: {type: salesforce, instance_url: "${SF_INSTANCE_URL}", session_id: "${SF_SESSION_ID}",
        ca_bundle: "${SF_CA_BUNDLE}"}
entities:
  - name: contacts
    source: files
    key: id
    target: sf
    target_table: Contact
    external_id: Legacy_Id__c
    fields:
      Nickname__c: {from: name}
"""
    (tmp_path / "mapping.yaml").write_text(mapping, encoding="utf-8")
    result = CliRunner().invoke(app, ["validate", "--check-target", str(tmp_path / "mapping.yaml")])
    assert result.exit_code == 1, result.output
    assert "field `Nickname__c` does not exist on Contact" in result.output
    assert "required field `LastName` of Contact is not mapped" in result.output
    assert salesforce_env.session_id not in result.output  # the secret never shows
    assert not salesforce_env.store.records["Contact"]  # nothing written
