"""Benchmark: what keeping before-images costs an update run, and how fast a rollback undoes it.

    .venv/bin/python bench/rollback.py                  # 1,000,000 rows
    .venv/bin/python bench/rollback.py --rows 200000 --repeat 1

It generates the SQLite source of bench/migrate_sqlite.py, loads it once with the flow, then changes the
mapping (`name` becomes upper case instead of title case) so that a second run updates every row. That update
run is measured, each time in a fresh subprocess over a copy of the same loaded target:

  with      the flow as it is: every updated row's ledger entry keeps the before-image of the changed field
  without   the same run with `steps.before_image` replaced by one that keeps nothing (the ledger still says
            which fields changed: deciding `updated` needs that anyway)
  rollback  `flows.rollback.apply_rollback` of the `with` run (after a dry-run plan): every row restored

Run time is from the first extracted batch to the end of the run (Prefect's start-up excluded, it is the
same for both). Only ratios and rates are printed, never asserted: they depend on the machine.
"""

from __future__ import annotations

import time

_PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import migrate_sqlite as base  # noqa: E402  (the source generator and mapping of the copy benchmark)

RESULT_MARK = "BENCH-RESULT "
LOADED = "target_loaded.db"
TARGET = "target_flow.db"


def _update_mapping(where: Path) -> None:
    text = (where / "mapping.yaml").read_text(encoding="utf-8")
    changed = text.replace("transform: [collapse_whitespace, title]", "transform: [collapse_whitespace, upper]", 1)
    assert changed != text
    (where / "mapping.yaml").write_text(changed, encoding="utf-8")


class _Clock:
    def __init__(self) -> None:
        self.first_read: float | None = None
        self.first_cpu: float | None = None

    def stage(self, entity: str, stage: str, total: int | None = None) -> None:
        if stage == "extract" and self.first_read is None:
            self.first_read, self.first_cpu = time.perf_counter(), time.process_time()

    def advance(self, entity: str, stage: str, rows: int) -> None:
        pass

    def done(self, entity: str, stage: str) -> None:
        pass


def _run_flow(where: Path) -> tuple[dict, float, Path, float]:
    from crmbridge.flows.prefect_env import configure_prefect

    configure_prefect()
    from crmbridge.flows import migrate, progress

    clock = _Clock()
    progress.install(clock)
    run, result = migrate.start_run(where / "mapping.yaml")
    # CPU seconds of this process (all its threads; not the Prefect server's): what a busy machine distorts least.
    cpu = time.process_time() - clock.first_cpu
    return result["entities"][0], time.perf_counter() - clock.first_read, run.path, cpu


def child(mode: str, where: Path) -> None:
    if mode == "load":
        buckets, seconds, _, _ = _run_flow(where)
        result = {"created": buckets["created"], "seconds": seconds}
    elif mode in ("with", "without"):
        if mode == "without":
            from crmbridge.flows import steps

            steps.before_image = lambda entity, values, changed: None  # keep no before-image
        buckets, seconds, run_path, cpu = _run_flow(where)
        from crmbridge.staging import Staging

        staging = Staging(run_path / "staging.duckdb")
        kept = staging.con.execute("SELECT count(before_image) FROM ledger").fetchone()[0]
        staging.close()
        result = {"updated": buckets["updated"], "seconds": seconds, "cpu": cpu, "run": str(run_path),
                  "before_images": kept,
                  "staging_mib": (run_path / "staging.duckdb").stat().st_size / 2**20}
    else:  # rollback of the given run directory
        from crmbridge.flows.rollback import apply_rollback, plan_rollback
        from crmbridge.runs import RunDir

        run = RunDir(Path(os.environ["BENCH_RUN"]))
        began, cpu = time.perf_counter(), time.process_time()
        plan = plan_rollback(run)
        planned, planned_cpu = time.perf_counter(), time.process_time()
        report = apply_rollback(run)
        done = time.perf_counter()
        entity = report.as_dict()["entities"][0]
        result = {"plan_s": planned - began, "apply_s": done - planned, "restored": entity["restored"],
                  "plan_cpu": planned_cpu - cpu, "apply_cpu": time.process_time() - planned_cpu,
                  "planned": plan.as_dict()["entities"][0]["restored"], "balanced": entity["balanced"]}
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_child(mode: str, where: Path, env: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--where", str(where)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the `{mode}` measurement failed (exit code {done.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK):])


def _names(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT external_id, name FROM customer ORDER BY external_id LIMIT 1000").fetchall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=base.BATCH_SIZE)
    parser.add_argument("--repeat", type=int, default=2, help="update runs of each kind, alternating")
    parser.add_argument("--workdir", type=Path, help="keep the generated source there (default: temporary)")
    parser.add_argument("--child")
    parser.add_argument("--where", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.where)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crmbridge-bench-rollback-"))
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home"), "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}  # a busy machine starts it slowly
    try:
        where = base.prepare(workdir, args.rows, args.batch_size)
        if (where / LOADED).exists() and base._count(where / LOADED, "customer") == args.rows:
            print("reusing the loaded target of an earlier run in --workdir", flush=True)
        else:
            loaded = run_child("load", where, env)
            print(f"loaded {loaded['created']:,} rows in {loaded['seconds']:.1f} s", flush=True)
            shutil.copy(where / TARGET, where / LOADED)
        _update_mapping(where)
        timings: dict[str, list[dict]] = {"with": [], "without": []}
        for i in range(args.repeat):
            # Alternating, and ending with `with`: the rollback below undoes that last run on the target on disk.
            for mode in (("without", "with") if (args.repeat - i) % 2 == 1 else ("with", "without")):
                shutil.copy(where / LOADED, where / TARGET)
                result = run_child(mode, where, env)
                if result["updated"] != args.rows:
                    raise SystemExit(f"the `{mode}` run updated {result['updated']:,} of {args.rows:,} rows")
                timings[mode].append(result)
                print(f"  update run {mode:>7} before-images: {result['seconds']:6.1f} s wall, {result['cpu']:6.1f} s "
                      f"CPU ({result['before_images']:,} kept, staging {result['staging_mib']:.0f} MiB)", flush=True)
        print(f"\n{args.rows:,}-row update run, best of {args.repeat}:")
        for unit, key in (("wall", "seconds"), ("CPU", "cpu")):
            best = {mode: min(r[key] for r in runs) for mode, runs in timings.items()}
            print(f"  {unit:>4}: without before-images {best['without']:7.1f} s, with {best['with']:7.1f} s; "
                  f"ratio with/without {best['with'] / best['without']:.3f} "
                  f"({100 * (best['with'] / best['without'] - 1):+.1f}%)")

        last_with = timings["with"][-1]
        before = _names(where / LOADED)
        undone = run_child("rollback", where, {**env, "BENCH_RUN": last_with["run"]})
        same = _names(where / TARGET) == before
        print(f"  rollback: plan {undone['plan_s']:.1f} s ({undone['plan_cpu']:.1f} s CPU), apply "
              f"{undone['apply_s']:.1f} s ({undone['apply_cpu']:.1f} s CPU) for "
              f"{undone['restored']:,} restored rows ({undone['restored'] / undone['apply_s']:,.0f} rows/s; "
              f"{undone['apply_s'] / last_with['seconds']:.2f}x the update run); balanced: {undone['balanced']}; "
              f"first 1,000 rows equal to the loaded state: {same}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
