"""Benchmark: contacts loaded into the local Salesforce emulator through Bulk API 2.0 vs sObject Collections.

    python bench/salesforce_load.py                  # 200,000 contacts under 1,000 accounts
    python bench/salesforce_load.py --rows 20000     # a quick look

Both paths run the real connector (`connectors/salesforce.py`) and the real simple-salesforce client over
HTTPS against the emulator (tests/emulators/salesforce), in batches like the flow's load step: contacts link
to their account by external id (`Account.Legacy_Id__c`), every row's result is read back. Printed per path:
API calls used, records/s, and the ratio to sObject Collections measured in the same run. The emulator is
one Python process, so absolute rates say little about a real org; the calls used are what a real org counts
against its daily quota. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the emulator lives with the tests

from emulators.salesforce import start_emulator  # noqa: E402

from crmbridge.connectors import connector_for  # noqa: E402
from crmbridge.mappings import load_mapping  # noqa: E402
from crmbridge.values import RowBatch  # noqa: E402

MAPPING = """
version: 1
name: bench-salesforce
sources:
  files: {{type: csv, path: data.csv}}
targets:
  sf:
    type: salesforce
    instance_url: {url}
    session_id: {sid}
    ca_bundle: {ca}
    bulk_threshold: {threshold}
entities:
  - name: accounts
    source: files
    key: id
    target: sf
    target_table: Account
    external_id: Legacy_Id__c
    fields:
      Name: {{from: name, max_length: 255}}
  - name: contacts
    source: files
    key: id
    target: sf
    target_table: Contact
    external_id: Legacy_Id__c
    fields:
      AccountId: {{from: account, ref: accounts}}
      FirstName: {{from: first, max_length: 40}}
      LastName: {{from: last, max_length: 80}}
      Email: {{from: email, max_length: 80}}
      Phone: {{from: phone, max_length: 40}}
      Birthdate: {{from: born, type: date}}
"""


def _target(workdir: Path, emulator, threshold: int):
    (workdir / "data.csv").write_text("id,name,account,first,last,email,phone,born\n")
    url, sid, ca, _ = emulator
    path = workdir / f"mapping-{threshold}.yaml"
    path.write_text(MAPPING.format(url=url, sid=sid, ca=ca, threshold=threshold), encoding="utf-8")
    mapping = load_mapping(path)
    target = connector_for(mapping.targets["sf"], mapping).open_target()
    for entity in mapping.entities:
        target.prepare(entity, dry_run=False)
    return mapping, target


def _contacts(start: int, stop: int, accounts: int) -> RowBatch:
    ids = range(start, stop)
    return RowBatch({
        "Legacy_Id__c": [f"con-{i}" for i in ids],
        "AccountId": [f"acc-{i % accounts}" for i in ids],
        "FirstName": [f"First{i % 997}" for i in ids],
        "LastName": [f"Last{i}" for i in ids],
        "Email": [f"person{i}@example.com" for i in ids],
        "Phone": [f"+86138{i:08d}" for i in ids],
        "Birthdate": [dt.date(1960 + i % 40, 1 + i % 12, 1 + i % 28) for i in ids],
    })


def measure(label: str, rows: int, accounts: int, batch: int, threshold: int) -> dict:
    emulator = start_emulator()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mapping, target = _target(Path(tmp), emulator, threshold)
            parents = RowBatch({"Legacy_Id__c": [f"acc-{i}" for i in range(accounts)],
                                "Name": [f"Company {i}" for i in range(accounts)]})
            target.write(mapping.entity("accounts"), parents)
            calls_before = target.api.calls
            contacts = mapping.entity("contacts")
            failed = 0
            started = time.perf_counter()
            for start in range(0, rows, batch):
                failed += len(target.write(contacts, _contacts(start, min(start + batch, rows), accounts)))
            seconds = time.perf_counter() - started
            loaded = len(emulator.store.records["Contact"])
            return {"label": label, "rows": rows, "loaded": loaded, "failed": failed, "seconds": seconds,
                    "calls": target.api.calls - calls_before, "rate": rows / seconds}
    finally:
        emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=50_000, help="rows per write, as the flow batches")
    args = parser.parse_args()
    print(f"{args.rows:,} contacts under {args.accounts:,} accounts, batches of {args.batch_size:,}, "
          "against the local emulator")
    collections = measure("sObject Collections", args.rows, args.accounts, args.batch_size, threshold=10**9)
    bulk = measure("Bulk API 2.0", args.rows, args.accounts, args.batch_size, threshold=1)
    for result in (collections, bulk):
        print(f"{result['label']:<20} {result['calls']:>6,} API calls  {result['rate']:>9,.0f} records/s  "
              f"({result['seconds']:.1f} s, {result['loaded']:,} loaded, {result['failed']} refused)  "
              f"x{result['rate'] / collections['rate']:.2f} of Collections' rate, "
              f"{result['calls'] / collections['calls']:.3f} of its calls")


if __name__ == "__main__":
    main()
