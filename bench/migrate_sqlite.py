"""Benchmark: the crmbridge flow against a plain pandas copy and a plain sqlite3 copy, SQLite to SQLite.

    python bench/migrate_sqlite.py                      # 200,000 and 1,000,000 rows
    python bench/migrate_sqlite.py --rows 500000 --also 0

For every row count it generates a SQLite source of customer-like rows (with messy whitespace and case),
then measures, each in a fresh subprocess of its own (so peak memory is per measurement):

  flow         `crmbridge.flows.migrate.start_run` end to end: extract, cleanse, validate, stage, load
               (upsert), ledger and reconciliation, into a table the mapping creates
  pandas       `pandas.read_sql(..., chunksize=batch)` + `DataFrame.to_sql(...)`: the plain copy
  executemany  `sqlite3` `fetchmany` + `executemany` in one transaction: the upper baseline for writing
               SQLite from Python

Only rates and ratios are printed, never asserted: they depend on the machine. See bench/README.md.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()  # before the heavy imports, so a child can report its import time

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from datetime import date, timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

SEED = 20261123
BATCH_SIZE = 50_000
RESULT_MARK = "BENCH-RESULT "
MODES = ("flow", "pandas", "executemany")
COLUMNS = ("id", "name", "email", "phone", "city", "balance", "signup_date")

MAPPING = """\
version: 1
name: bench-sqlite-to-sqlite
settings:
  batch_size: {batch_size}
  state_dir: state
sources:
  legacy:
    type: sql
    url: sqlite:///source.db
targets:
  crm:
    type: sql
    url: sqlite:///target_flow.db
entities:
  - name: customers
    source: legacy
    table: customers
    key: id
    columns:                # checked against the source before a row is read
      id: integer
      name: string
      email: string
      phone: string
      city: string
      balance: decimal
      signup_date: date
    target: crm
    target_table: customer
    create_table: true
    fields:
      name:
        from: name
        transform: [collapse_whitespace, title]
        required: true
      email:
        from: email
        transform: [trim, lower]
        required: true
      phone:
        from: phone
        transform: [digits_only]
      city:
        from: city
        transform: [trim, title]
      balance:
        from: balance
        type: decimal
      signup_date:
        from: signup_date
        type: date
"""

# --- source data ---------------------------------------------------------------------------------------

_FIRST = ["James", "Mary", "Wei", "Li", "Fatima", "Olga", "Carlos", "Aiko", "Noah", "Emma", "Liam", "Sofia",
          "Mateo", "Chloe", "Arjun", "Zoe", "Hana", "Ivan", "Lucas", "Amara"]
_LAST = ["Smith", "Johnson", "Wang", "Zhang", "Garcia", "Muller", "Rossi", "Tanaka", "Nguyen", "Brown",
         "Kowalski", "Silva", "O'Brien", "van Dijk", "Haddad", "Novak", "Jensen", "Moreau", "Kim", "Okafor"]
_CITIES = ["new york", "Shanghai", "SAO PAULO", "berlin", "Lagos", "tokyo", "Paris", "mumbai", "Toronto",
           "mexico city", "London", "SYDNEY", "cape town", "Seoul", "madrid"]
_DOMAINS = ["example.com", "Example.org", "mail.test", "corp.example", "EXAMPLE.NET"]


def _messy(rng: random.Random, text: str) -> str:
    roll = rng.random()
    if roll < 0.15:
        text = text.upper()
    elif roll < 0.30:
        text = text.lower()
    roll = rng.random()
    if roll < 0.10:
        return f"  {text}"
    if roll < 0.20:
        return f"{text}   "
    if roll < 0.25:
        return text.replace(" ", "   ")
    return text


def _phone(rng: random.Random) -> str:
    d = f"{rng.randrange(10**9, 10**10)}"
    return rng.choice([f"({d[:3]}) {d[3:6]}-{d[6:]}", f"{d[:3]}-{d[3:6]}-{d[6:]}", f"+1 {d[:3]} {d[3:6]} {d[6:]}",
                       f"  {d} ", f"{d[:3]}.{d[3:6]}.{d[6:]}"])


def generate_source(path: Path, rows: int) -> None:
    """A deterministic SQLite source of `rows` customer-like rows (same seed, same file)."""
    rng = random.Random(SEED)
    temporary = path.with_suffix(".tmp")
    temporary.unlink(missing_ok=True)
    db = sqlite3.connect(temporary)
    db.execute("""CREATE TABLE customers (
        id INTEGER PRIMARY KEY, name TEXT, email TEXT, phone TEXT, city TEXT,
        balance NUMERIC(12, 2), signup_date DATE)""")
    start = date(2005, 1, 1)
    chunk = []
    for i in range(1, rows + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        email = f"{first}.{last}{i}@{rng.choice(_DOMAINS)}".replace(" ", "").replace("'", "")
        chunk.append((
            i, _messy(rng, f"{first} {last}"), _messy(rng, email), _phone(rng), _messy(rng, rng.choice(_CITIES)),
            round(rng.uniform(-500, 250_000), 2), (start + timedelta(days=rng.randrange(0, 7000))).isoformat(),
        ))
        if len(chunk) == 100_000:
            db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?)", chunk)
            chunk.clear()
    db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?)", chunk)
    db.commit()
    db.close()
    temporary.replace(path)


def prepare(workdir: Path, rows: int, batch_size: int) -> Path:
    """The directory for one row count: source (kept between runs), mapping; targets and state removed."""
    where = workdir / f"rows-{rows}"
    where.mkdir(parents=True, exist_ok=True)
    source = where / "source.db"
    if not source.exists():
        began = time.perf_counter()
        generate_source(source, rows)
        print(f"  generated {rows:,} source rows in {time.perf_counter() - began:.1f} s ({source})", flush=True)
    (where / "mapping.yaml").write_text(MAPPING.format(batch_size=batch_size), encoding="utf-8")
    for name in ("target_flow.db", "target_pandas.db", "target_executemany.db"):
        (where / name).unlink(missing_ok=True)
    shutil.rmtree(where / "state", ignore_errors=True)
    return where


# --- the measurements (each runs in its own child process) ----------------------------------------------


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


class _Clock:
    """A progress reporter for the flow that notes when rows start and stop moving."""

    def __init__(self) -> None:
        self.first_read: float | None = None  # the first entity starts extracting
        self.last_loaded: float | None = None  # the last load batch is written

    def stage(self, entity: str, stage: str, total: int | None = None) -> None:
        if stage == "extract" and self.first_read is None:
            self.first_read = time.perf_counter()

    def advance(self, entity: str, stage: str, rows: int) -> None:
        if stage == "load":
            self.last_loaded = time.perf_counter()

    def done(self, entity: str, stage: str) -> None:
        if stage == "load":
            self.last_loaded = time.perf_counter()


def measure_flow(where: Path, rows: int, batch_size: int, rerun: bool) -> dict:
    from crmbridge.flows.prefect_env import configure_prefect

    prefect_mode = configure_prefect()
    from crmbridge.flows import migrate

    imported = time.perf_counter()
    clock = _Clock()
    migrate.progress_reporter = clock
    _, result = migrate.start_run(where / "mapping.yaml")
    finished = time.perf_counter()
    entity = result["entities"][0]
    out = {
        "import_s": imported - _PROCESS_START, "startup_s": clock.first_read - imported,
        "steady_s": clock.last_loaded - clock.first_read, "finish_s": finished - clock.last_loaded,
        "copied": _count(where / "target_flow.db", "customer"), "prefect": prefect_mode,
        "buckets": {k: entity[k] for k in ("source", "created", "updated", "unchanged", "quarantined")},
    }
    out["total_s"] = finished - _PROCESS_START
    if rerun:
        clock = _Clock()
        migrate.progress_reporter = clock
        began = time.perf_counter()
        _, result = migrate.start_run(where / "mapping.yaml")
        entity = result["entities"][0]
        out["rerun"] = {"total_s": time.perf_counter() - began, "steady_s": clock.last_loaded - clock.first_read,
                        "buckets": {k: entity[k] for k in ("source", "created", "updated", "unchanged",
                                                             "quarantined")}}
    return out


def measure_pandas(where: Path, rows: int, batch_size: int) -> dict:
    import pandas as pd

    imported = time.perf_counter()
    target_path = where / "target_pandas.db"
    # sqlite3 connections on both sides: pandas' fastest path for SQLite (no SQLAlchemy layer).
    source, target = sqlite3.connect(where / "source.db"), sqlite3.connect(target_path)
    query = f"SELECT {', '.join(COLUMNS)} FROM customers ORDER BY id"
    for chunk in pd.read_sql(query, source, chunksize=batch_size):
        chunk.to_sql("customer", target, if_exists="append", index=False)
    target.commit()
    source.close()
    target.close()
    finished = time.perf_counter()
    return {"import_s": imported - _PROCESS_START, "steady_s": finished - imported,
            "total_s": finished - _PROCESS_START, "copied": _count(target_path, "customer")}


def measure_executemany(where: Path, rows: int, batch_size: int) -> dict:
    imported = time.perf_counter()
    target_path = where / "target_executemany.db"
    source, target = sqlite3.connect(where / "source.db"), sqlite3.connect(target_path)
    target.execute("CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT, email TEXT, phone TEXT, city TEXT, "
                   "balance NUMERIC(12, 2), signup_date DATE)")
    cursor = source.execute(f"SELECT {', '.join(COLUMNS)} FROM customers ORDER BY id")
    insert = f"INSERT INTO customer VALUES ({', '.join('?' for _ in COLUMNS)})"
    target.execute("BEGIN")
    while batch := cursor.fetchmany(batch_size):
        target.executemany(insert, batch)
    target.commit()
    source.close()
    target.close()
    finished = time.perf_counter()
    return {"import_s": imported - _PROCESS_START, "steady_s": finished - imported,
            "total_s": finished - _PROCESS_START, "copied": _count(target_path, "customer")}


def child(mode: str, where: Path, rows: int, batch_size: int, rerun: bool) -> None:
    if mode == "flow":
        result = measure_flow(where, rows, batch_size, rerun)
    elif mode == "pandas":
        result = measure_pandas(where, rows, batch_size)
    else:
        result = measure_executemany(where, rows, batch_size)
    # Linux reports ru_maxrss in KiB: this process's own peak, not any helper process it started.
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(RESULT_MARK + json.dumps(result), flush=True)


# --- the parent: run the children, print the report ------------------------------------------------------


def run_child(mode: str, where: Path, rows: int, batch_size: int, rerun: bool, env: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--where", str(where),
               "--rows", str(rows), "--batch-size", str(batch_size)] + (["--rerun"] if rerun else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the `{mode}` measurement failed (exit code {done.returncode})")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    if result["copied"] != rows:
        raise SystemExit(f"the `{mode}` measurement copied {result['copied']:,} of {rows:,} rows")
    return result


def report(rows: int, results: dict[str, dict]) -> None:
    flow, pandas, many = results["flow"], results["pandas"], results["executemany"]

    def rate(seconds: float) -> float:
        return rows / seconds

    print(f"\n== {rows:,} rows ==")
    print(f"  {'':<22}{'rows/s':>12}{'seconds':>10}{'peak RSS':>12}")
    print(f"  {'flow (steady state)':<22}{rate(flow['steady_s']):>12,.0f}{flow['steady_s']:>10.2f}"
          f"{flow['peak_rss_mib']:>9.0f} MiB")
    print(f"  {'flow (end to end)':<22}{rate(flow['total_s']):>12,.0f}{flow['total_s']:>10.2f}")
    print(f"  {'pandas (copy)':<22}{rate(pandas['steady_s']):>12,.0f}{pandas['steady_s']:>10.2f}"
          f"{pandas['peak_rss_mib']:>9.0f} MiB")
    print(f"  {'pandas (with import)':<22}{rate(pandas['total_s']):>12,.0f}{pandas['total_s']:>10.2f}")
    print(f"  {'executemany (copy)':<22}{rate(many['steady_s']):>12,.0f}{many['steady_s']:>10.2f}"
          f"{many['peak_rss_mib']:>9.0f} MiB")
    print(f"  flow start-up: {flow['import_s']:.2f} s importing + {flow['startup_s']:.2f} s until the first "
          f"batch is read ({flow['prefect']}); {flow['finish_s']:.2f} s after the last batch is loaded")
    print(f"  flow / pandas, excluding start-up: {rate(flow['steady_s']) / rate(pandas['steady_s']):.2f}x")
    print(f"  flow / pandas, including start-up: {rate(flow['total_s']) / rate(pandas['total_s']):.2f}x "
          "(both counting their imports)")
    print(f"  flow / executemany, excluding start-up: {rate(flow['steady_s']) / rate(many['steady_s']):.2f}x")
    buckets = ", ".join(f"{k} {v:,}" for k, v in flow["buckets"].items())
    print(f"  flow reconciliation: {buckets}")
    if "rerun" in flow:
        again = flow["rerun"]
        buckets = ", ".join(f"{k} {v:,}" for k, v in again["buckets"].items())
        print(f"  second flow run (nothing changed): {rate(again['steady_s']):,.0f} rows/s steady, "
              f"{again['total_s']:.2f} s end to end; {buckets}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to copy (default 1,000,000)")
    parser.add_argument("--also", type=int, default=200_000,
                        help="a second, smaller row count, to show memory does not grow with rows (0: none)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="rows per batch (all three copies)")
    parser.add_argument("--only", choices=MODES, action="append", help="run only these measurements")
    parser.add_argument("--rerun", action="store_true", help="run the flow a second time (all rows unchanged)")
    parser.add_argument("--workdir", type=Path, help="keep sources here (default: a temporary directory)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--where", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child(args.child, args.where, args.rows, args.batch_size, args.rerun)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crmbridge-bench-"))
    env = {**os.environ}
    env.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    sizes = sorted({args.rows, *([args.also] if args.also else [])})
    modes = args.only or list(MODES)
    print(f"crmbridge SQLite -> SQLite benchmark: {', '.join(f'{n:,}' for n in sizes)} rows, batch size "
          f"{args.batch_size:,}, Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, work dir {workdir}")
    all_results = {}
    for rows in sizes:
        where = prepare(workdir, rows, args.batch_size)
        results = {}
        for mode in modes:
            results[mode] = run_child(mode, where, rows, args.batch_size, args.rerun, env)
            print(f"  {rows:,} rows, {mode}: {rows / results[mode]['steady_s']:,.0f} rows/s", flush=True)
        all_results[rows] = results
        if set(modes) == set(MODES):
            report(rows, results)
    if len(sizes) > 1 and "flow" in modes:
        peaks = ", ".join(f"{n:,} rows {all_results[n]['flow']['peak_rss_mib']:.0f} MiB" for n in sizes)
        print(f"\nflow peak RSS by row count: {peaks}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
