"""Benchmark: the crmbridge flow against plain copies, SQLite to SQLite, in one run.

    python bench/migrate_sqlite.py                 # 200,000 and 1,000,000 rows
    python bench/migrate_sqlite.py --rows 500000 --also 0 --rerun

For every row count it generates a SQLite source of customer-like rows (messy whitespace and case), then
runs each measurement in a fresh subprocess of its own, so every peak-memory figure belongs to one
measurement:

  flow            `crmbridge.flows.migrate.start_run` end to end: extract, cleanse, validate, stage, load
                  (upsert on the external id), ledger and reconciliation, into a table the mapping creates
  flow-rerun      (with --rerun) the same mapping again over the loaded target: every row is compared
                  with the target and reported unchanged
  pandas          `pandas.read_sql(..., chunksize=batch)` + `DataFrame.to_sql(...)` through SQLAlchemy
                  engines: the plain copy the flow is compared with
  pandas-sqlite3  the same with plain `sqlite3` connections (pandas' SQLite-only fallback), for reference
  executemany     `sqlite3` `fetchmany` + `executemany` in one transaction: the upper baseline for writing
                  SQLite from Python
  upsert          `sqlite3` `executemany` of an upsert into a table keyed like the flow's target (a text
                  primary key), one commit per batch: what the flow's write step alone costs at best

Only rates and ratios are printed, never asserted: they depend on the machine. See bench/README.md.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()  # before the heavy imports, so a child can report its import time

import argparse  # noqa: E402
import hashlib  # noqa: E402
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
BATCH_SIZE = 50_000  # the mapping default
RESULT_MARK = "BENCH-RESULT "
MODES = ("flow", "flow-rerun", "pandas", "pandas-sqlite3", "executemany", "upsert")
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


_TARGETS = ("target_flow.db", "target_pandas.db", "target_pandas_sqlite3.db", "target_executemany.db",
            "target_upsert.db")


def prepare(workdir: Path, rows: int, batch_size: int) -> Path:
    """The directory for one row count: source (kept between runs) and mapping; old targets removed."""
    where = workdir / f"rows-{rows}"
    where.mkdir(parents=True, exist_ok=True)
    source = where / "source.db"
    if not source.exists():
        began = time.perf_counter()
        generate_source(source, rows)
        print(f"  generated {rows:,} source rows in {time.perf_counter() - began:.1f} s", flush=True)
    (where / "mapping.yaml").write_text(MAPPING.format(batch_size=batch_size), encoding="utf-8")
    for name in _TARGETS:
        (where / name).unlink(missing_ok=True)
    shutil.rmtree(where / "state", ignore_errors=True)
    return where


# --- the measurements (each runs in a child process of its own) -----------------------------------------


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _query() -> str:
    return f"SELECT {', '.join(COLUMNS)} FROM customers ORDER BY id"


class _Clock:
    """A progress reporter for the flow that notes when rows start and stop moving."""

    def __init__(self) -> None:
        self.first_read: float | None = None  # the first entity starts extracting
        self.first_loaded: float | None = None  # the first load batch is in the target
        self.last_loaded: float | None = None  # the last load batch is in the target

    def stage(self, entity: str, stage: str, total: int | None = None) -> None:
        if stage == "extract" and self.first_read is None:
            self.first_read = time.perf_counter()

    def advance(self, entity: str, stage: str, rows: int) -> None:
        if stage == "load":
            self.last_loaded = time.perf_counter()
            self.first_loaded = self.first_loaded or self.last_loaded

    def done(self, entity: str, stage: str) -> None:
        if stage == "load":  # after the entity's last batch: its deferred index and merges count as loading
            self.last_loaded = time.perf_counter()


def _buckets(result: dict) -> dict[str, int]:
    entity = result["entities"][0]
    return {k: entity[k] for k in ("source", "created", "updated", "unchanged", "quarantined")}


def measure_flow(where: Path) -> dict:
    from crmbridge.flows.prefect_env import configure_prefect

    prefect_mode = configure_prefect()  # as the CLI does: a running `crmbridge server` is used if there is one
    from crmbridge.flows import migrate, progress

    imported = time.perf_counter()
    clock = _Clock()
    progress.install(clock)
    _, result = migrate.start_run(where / "mapping.yaml")
    finished = time.perf_counter()
    out = {
        "import_s": imported - _PROCESS_START, "startup_s": clock.first_read - imported,
        "first_loaded_s": clock.first_loaded - imported,
        "steady_s": clock.last_loaded - clock.first_read, "finish_s": finished - clock.last_loaded,
        "total_s": finished - _PROCESS_START, "copied": _count(where / "target_flow.db", "customer"),
        "prefect": prefect_mode, "buckets": _buckets(result),
    }
    return out


def measure_pandas(where: Path, batch_size: int, driver: str) -> dict:
    import pandas as pd

    imported = time.perf_counter()
    target_path = where / ("target_pandas.db" if driver == "sqlalchemy" else "target_pandas_sqlite3.db")
    if driver == "sqlalchemy":
        # SQLAlchemy engines, as pandas reads and writes every database (and as the flow connects);
        # `to_sql` commits each chunk, as the flow commits each batch.
        import sqlalchemy as sa

        source = sa.create_engine(f"sqlite:///{where / 'source.db'}")
        target = sa.create_engine(f"sqlite:///{target_path}")
        for chunk in pd.read_sql(sa.text(_query()), source, chunksize=batch_size):
            chunk.to_sql("customer", target, if_exists="append", index=False)
        source.dispose()
        target.dispose()
    else:  # plain sqlite3 connections: pandas' SQLite-only fallback, without SQLAlchemy
        read, write = sqlite3.connect(where / "source.db"), sqlite3.connect(target_path)
        for chunk in pd.read_sql(_query(), read, chunksize=batch_size):
            chunk.to_sql("customer", write, if_exists="append", index=False)
        write.commit()
        read.close()
        write.close()
    return _plain_copy_result(imported, target_path)


def _plain_copy_result(imported: float, target_path: Path) -> dict:
    """Timings of a plain copy that has just finished, and the rows its target holds."""
    finished = time.perf_counter()
    return {"import_s": imported - _PROCESS_START, "steady_s": finished - imported,
            "total_s": finished - _PROCESS_START, "copied": _count(target_path, "customer")}


def measure_executemany(where: Path, batch_size: int, upsert: bool) -> dict:
    imported = time.perf_counter()
    target_path = where / ("target_upsert.db" if upsert else "target_executemany.db")
    source, target = sqlite3.connect(where / "source.db"), sqlite3.connect(target_path)
    key = "external_id VARCHAR(64) PRIMARY KEY" if upsert else "id INTEGER PRIMARY KEY"
    target.execute(f"CREATE TABLE customer ({key}, name TEXT, email TEXT, phone TEXT, city TEXT, "
                   "balance NUMERIC(30, 8), signup_date DATE)")
    cursor = source.execute(_query())
    insert = f"INSERT INTO customer VALUES ({', '.join('?' for _ in COLUMNS)})"
    if upsert:  # the statement shape the flow sends, keyed by a well-spread text id
        insert += " ON CONFLICT (external_id) DO UPDATE SET " + ", ".join(
            f"{c} = excluded.{c}" for c in COLUMNS[1:])
        # the flow's SQLite target connection uses the same 64 MiB page cache
        target.execute("PRAGMA cache_size = -65536")
    else:
        target.execute("BEGIN")
    while batch := cursor.fetchmany(batch_size):
        if upsert:
            batch = [(hashlib.md5(str(row[0]).encode()).hexdigest(), *row[1:]) for row in batch]
        target.executemany(insert, batch)
        if upsert:
            target.commit()
    target.commit()
    source.close()
    target.close()
    return _plain_copy_result(imported, target_path)


def child(mode: str, where: Path, batch_size: int) -> None:
    if mode in ("flow", "flow-rerun"):  # a rerun finds the target the `flow` measurement loaded
        result = measure_flow(where)
    elif mode in ("pandas", "pandas-sqlite3"):
        result = measure_pandas(where, batch_size, "sqlalchemy" if mode == "pandas" else "sqlite3")
    else:
        result = measure_executemany(where, batch_size, upsert=mode == "upsert")
    # Linux reports ru_maxrss in KiB: this process's own peak, not that of any process it started (such as
    # a temporary Prefect server).
    own = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mib"] = own.ru_maxrss / 1024
    # CPU time is steadier than wall time on a shared machine. The flow's children (the audit writer, the
    # temporary Prefect server) run beside it on the other core; they are counted once they have exited.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = own.ru_utime + own.ru_stime
    result["children_cpu_s"] = children.ru_utime + children.ru_stime
    print(RESULT_MARK + json.dumps(result), flush=True)


# --- the parent: run the children, print the report ------------------------------------------------------


def run_child(mode: str, where: Path, rows: int, batch_size: int, env: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--where", str(where),
               "--batch-size", str(batch_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the `{mode}` measurement failed (exit code {done.returncode})")
    result = json.loads(lines[-1][len(RESULT_MARK):])
    if result["copied"] != rows:
        raise SystemExit(f"the `{mode}` measurement copied {result['copied']:,} of {rows:,} rows")
    return result


_LABELS = {
    "pandas": "pandas read_sql + to_sql",
    "pandas-sqlite3": "  same, sqlite3 connections",
    "executemany": "sqlite3 executemany (upper)",
    "upsert": "sqlite3 keyed upsert only",
}


def report(rows: int, results: dict[str, dict]) -> None:
    def rate(seconds: float) -> str:
        return f"{rows / seconds:>12,.0f}"

    def line(label: str, seconds: float, peak: float | None = None) -> None:
        memory = f"{peak:>9.0f} MiB" if peak is not None else ""
        print(f"  {label:<32}{rate(seconds)}{seconds:>10.2f}{memory}")

    print(f"\n== {rows:,} rows ==")
    print(f"  {'':<32}{'rows/s':>12}{'seconds':>10}{'peak RSS':>13}")
    flow = results.get("flow")
    if flow:
        line("flow, steady state", flow["steady_s"], flow["peak_rss_mib"])
        line("flow, end to end", flow["total_s"])
    for mode, label in _LABELS.items():
        if mode in results:
            line(label, results[mode]["steady_s"], results[mode]["peak_rss_mib"])
    if not flow:
        return
    print(f"  flow start-up: {flow['import_s']:.2f} s importing, then {flow['startup_s']:.2f} s until the first "
          f"batch is read; {flow['finish_s']:.2f} s after the last batch is loaded")
    print(f"    (Prefect: {flow['prefect']})")
    print(f"  first rows in the target {flow['first_loaded_s']:.2f} s after start_run was called (every row is "
          "staged before any is loaded)")
    if "pandas" in results:
        pandas = results["pandas"]
        print(f"  CPU time: flow process {flow['cpu_s']:.1f} s (its helper processes {flow['children_cpu_s']:.1f} s: "
              f"audit writer, Prefect server), pandas {pandas['cpu_s']:.1f} s; flow / pandas in CPU time of the "
              f"main process {pandas['cpu_s'] / flow['cpu_s']:.2f}x")
        print(f"  flow / pandas, excluding start-up: {pandas['steady_s'] / flow['steady_s']:.2f}x "
              "(first batch read to last batch loaded, against the copy loop)")
        print(f"  flow / pandas, including start-up: {pandas['total_s'] / flow['total_s']:.2f}x "
              "(process start to finish, imports included on both sides)")
    if "upsert" in results:
        print(f"  the keyed upsert alone takes {results['upsert']['steady_s'] / flow['steady_s']:.0%} of the "
              "flow's steady-state time")
    print(f"  flow reconciliation: {', '.join(f'{k} {v:,}' for k, v in flow['buckets'].items())}")
    if "flow-rerun" in results:
        again = results["flow-rerun"]
        print(f"  second run of the same mapping: {rate(again['steady_s']).strip()} rows/s steady, "
              f"{rate(again['total_s']).strip()} rows/s end to end, peak RSS {again['peak_rss_mib']:.0f} MiB; "
              f"{', '.join(f'{k} {v:,}' for k, v in again['buckets'].items())}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows to copy (default 1,000,000)")
    parser.add_argument("--also", type=int, default=200_000,
                        help="a second row count, to compare peak memory (default 200,000; 0: none)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="rows per batch, for every copy")
    parser.add_argument("--only", choices=MODES, action="append", help="run only these measurements")
    parser.add_argument("--rerun", action="store_true",
                        help="also run the flow a second time over its own target (every row unchanged)")
    parser.add_argument("--persistent-server", action="store_true",
                        help="start a persistent local Prefect server first (`crmbridge server start`), as a "
                             "team running many migrations would, instead of a temporary one per run")
    parser.add_argument("--workdir", type=Path, help="keep the generated sources here (default: a temporary "
                                                     "directory, removed at the end)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--where", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child(args.child, args.where, args.batch_size)
        return

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="crmbridge-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CRMBRIDGE_HOME": str(workdir / "crmbridge-home")}  # never the user's server
    env.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    sizes = sorted({args.rows, *([args.also] if args.also else [])})
    modes = [m for m in (args.only or MODES) if m != "flow-rerun" or args.rerun]
    if "flow-rerun" in modes and "flow" not in modes:
        parser.error("`flow-rerun` needs the `flow` measurement before it")
    print(f"crmbridge SQLite -> SQLite benchmark: {', '.join(f'{n:,}' for n in sizes)} rows, batch size "
          f"{args.batch_size:,}; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; work dir {workdir}")
    server = None
    if args.persistent_server and "flow" in modes:
        os.environ["CRMBRIDGE_HOME"] = env["CRMBRIDGE_HOME"]
        from crmbridge.flows.prefect_env import start_server

        server = start_server()
    all_results: dict[int, dict[str, dict]] = {}
    try:
        for rows in sizes:
            where = prepare(workdir, rows, args.batch_size)
            results = {}
            for mode in modes:
                results[mode] = run_child(mode, where, rows, args.batch_size, env)
                print(f"  {rows:,} rows, {mode}: {rows / results[mode]['steady_s']:,.0f} rows/s", flush=True)
            all_results[rows] = results
            report(rows, results)
    finally:
        if server is not None:
            from crmbridge.flows.prefect_env import stop_server

            stop_server()
    if len(sizes) > 1:
        for mode in modes:
            peaks = ", ".join(f"{n:,} rows {all_results[n][mode]['peak_rss_mib']:.0f} MiB" for n in sizes)
            print(f"peak RSS of `{mode}` by row count: {peaks}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
