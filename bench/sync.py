"""Benchmark: an incremental sync cycle against a full reload of the same data, in one run.

    .venv/bin/python bench/sync.py                          # 500,000 customers, 1% changed
    .venv/bin/python bench/sync.py --customers 50000 --changed 0.02

The ERP is the SOAP emulator of the tests (tests/emulators/erp: real WSDL, real zeep client) holding
`--customers` records; the target is a SQLite file (or `--target-url`). Steps, all through the real flows:

  1. first sync cycle: every record (establishes the target and the watermark)   -- reported, not compared
  2. `--changed` of the customers updated in the ERP; one incremental cycle (`crmbridge-sync`)  -- timed
  3. as many other customers updated; a full reload with `crmbridge-migrate` over the list operation,
     which reads every record and upserts what differs                              -- timed

Both timed runs bring the target to the ERP's state (checked); the printed ratio is full / incremental.
Times depend on the machine and are only printed, never asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

T0 = datetime(2026, 1, 5, 7, 0, 0, tzinfo=UTC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=500_000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of customers changed (default 0.01)")
    parser.add_argument("--page-size", type=int, default=2000, help="records per SOAP call")
    parser.add_argument("--batch-size", type=int, default=50_000)
    parser.add_argument("--target-url", help="SQLAlchemy URL of the target (default: a SQLite file)")
    args = parser.parse_args()

    import os

    workdir = Path(tempfile.mkdtemp(prefix="crmbridge-bench-sync-"))
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect"))
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    import sqlalchemy as sa
    from emulators.erp import ErpServer

    from crmbridge.flows.migrate import start_run
    from crmbridge.flows.sync import start_sync

    target_url = args.target_url or f"sqlite:///{workdir / 'crm.db'}"
    changed = max(1, int(args.customers * args.changed))
    erp = ErpServer(frozen_at=T0).start()
    # Changed over the past weeks, one every few seconds, as a real customer master's are.
    erp.records = {f"B{i:07d}": _record(i, T0 - timedelta(seconds=3 * (args.customers - i)))
                   for i in range(args.customers)}
    mapping = workdir / "sync.yaml"
    mapping.write_text(f"""version: 1
name: bench-sync
settings: {{batch_size: {args.batch_size}, state_dir: state}}
sources:
  erp:
    type: soap
    wsdl: {erp.wsdl_url}
    list_operation: ListCustomers
    changes_operation: GetChangedCustomers
    page_size: {args.page_size}
    retries: 0
    timezone: UTC
targets:
  crm: {{type: sql, url: "{target_url}"}}
entities:
  - name: customers
    source: erp
    key: Id
    target: crm
    target_table: customers
    create_table: true
    fields:
      name: {{from: Name}}
      email: {{from: Email}}
      city: {{from: Address.City}}
      credit_limit: {{from: CreditLimit, type: decimal}}
    sync:
      watermark: ModifiedAt
      overlap: 60
      deleted_flag: Deleted
      deletes: delete
""", encoding="utf-8")
    print(f"{args.customers:,} customers in the ERP emulator; {changed:,} changed before each timed run; "
          f"target {target_url.split(':')[0]}")

    started = time.perf_counter()
    first = start_sync(mapping)["entities"][0]
    print(f"first cycle (everything):   {time.perf_counter() - started:8.1f} s   created {first['created']:,}")

    _change(erp, range(0, args.customers, args.customers // changed)[:changed], T0 + timedelta(minutes=10), "A")
    started = time.perf_counter()
    cycle = start_sync(mapping)["entities"][0]
    incremental = time.perf_counter() - started
    _check(erp, target_url, sa)
    print(f"incremental cycle:          {incremental:8.1f} s   read {cycle['read']:,}, updated {cycle['updated']:,}")

    _change(erp, range(1, args.customers, args.customers // changed)[:changed], T0 + timedelta(minutes=20), "B")
    started = time.perf_counter()
    _, result = start_run(mapping)
    full = time.perf_counter() - started
    reload = result["entities"][0]
    _check(erp, target_url, sa)
    print(f"full reload:                {full:8.1f} s   read {reload['source']:,}, updated {reload['updated']:,}")
    print(f"ratio full reload / incremental cycle: {full / incremental:.1f}x")
    erp.stop()


def _record(i: int, stamp: datetime) -> dict:
    return {"Id": f"B{i:07d}", "Name": f"Customer {i}", "Email": f"c{i}@example.org",
            "City": ("Berlin", "Lyon", "Wuhan", "Porto")[i % 4], "CreditLimit": Decimal(i % 10_000),
            "ModifiedAt": stamp, "Deleted": False}


def _change(erp, positions: range, stamp: datetime, tag: str) -> None:
    erp.frozen_at = stamp
    erp.upsert(*({"Id": f"B{i:07d}", "Name": f"Customer {i} ({tag})"} for i in positions))


def _check(erp, url: str, sa) -> None:
    """The target holds exactly the ERP's names (a full comparison: the benchmark must not measure a bug)."""
    from crmbridge.mappings.cleanse import external_ids

    live = erp.live()
    expected = dict(zip(external_ids("erp", "customers", list(live)), (r["Name"] for r in live.values()),
                        strict=True))
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = dict(conn.execute(sa.text("SELECT external_id, name FROM customers")).fetchall())
    engine.dispose()
    if found != expected:
        raise SystemExit(f"target differs from the ERP ({len(found):,} rows, {len(expected):,} expected)")


if __name__ == "__main__":
    main()
