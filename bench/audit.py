"""Benchmark: the cost of the record-level audit trail, and how fast a large log verifies.

    python bench/audit.py                      # 1,000,000 rows, audit off / on, then verify
    python bench/audit.py --rows 200000 --repeat 2

The same SQLite -> SQLite migration as bench/migrate_sqlite.py (same generated source, same mapping),
run with `settings.audit.record_events: false` (run and batch events only) and `true` (one hash-chained
event per created row, written through SQLAlchemy into the project's SQLite audit store), each in a fresh
subprocess, alternating the order when repeated. The time measured is from the first batch read to
`start_run` returning, so it includes the audit writer's final flush and the signed checkpoint, but not
Prefect's start-up (which does not depend on the audit). Then `verify_store` recomputes the whole chain and
checks the checkpoint. Prints ratios only; nothing is asserted (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import migrate_sqlite as base  # noqa: E402  (the source generator, the mapping and the flow clock)

RESULT_MARK = "AUDIT-BENCH "
AUDIT_BLOCK = """  audit:
    record_events: {record_events}
    purpose: benchmark
    lawful_basis: contract
"""


def prepare(workdir: Path, rows: int, batch_size: int, mode: str) -> Path:
    source = workdir / f"source-{rows}.db"
    if not source.exists():
        began = time.perf_counter()
        base.generate_source(source, rows)
        print(f"  generated {rows:,} source rows in {time.perf_counter() - began:.1f} s", flush=True)
    where = workdir / f"{mode}-{rows}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    os.link(source, where / "source.db") if hasattr(os, "link") else shutil.copy(source, where / "source.db")
    mapping = base.MAPPING.format(batch_size=batch_size).replace(
        "  state_dir: state\n", "  state_dir: state\n" + AUDIT_BLOCK.format(record_events=str(mode == "on").lower()))
    (where / "mapping.yaml").write_text(mapping, encoding="utf-8")
    return where


def child_flow(where: Path) -> dict:
    from crmbridge.flows.prefect_env import configure_prefect

    configure_prefect()
    import resource

    from crmbridge.flows import migrate, progress

    clock = base._Clock()
    progress.install(clock)
    cpu_before = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    _, result = migrate.start_run(where / "mapping.yaml")
    finished = time.perf_counter()
    # CPU seconds of the run (this process, plus reaped children such as the audit writer): unlike wall time,
    # not inflated when other work shares the machine.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu_before[0] + children.ru_utime + children.ru_stime - cpu_before[1]
    import sqlite3

    with sqlite3.connect(where / "state" / "audit.db") as db:
        events = db.execute("SELECT count(*) FROM audit_events").fetchone()[0]
    return {"seconds": finished - clock.first_read, "cpu_seconds": cpu, "events": events,
            "created": result["entities"][0]["created"]}


def child_verify(where: Path) -> dict:
    from crmbridge.audit.project import open_store, signer_for
    from crmbridge.audit.verify import verify_store
    from crmbridge.mappings import load_mapping

    mapping = load_mapping(where / "mapping.yaml")
    store = open_store(mapping)
    began, cpu = time.perf_counter(), time.process_time()
    result = verify_store(store, signer_for(mapping, create=False).public)
    return {"seconds": time.perf_counter() - began, "cpu_seconds": time.process_time() - cpu,
            "events": result.events, "ok": result.ok, "checkpoints": result.checkpoints}


def run_child(kind: str, where: Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--where", str(where)], env=env,
                          capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"the `{kind}` measurement failed (exit code {done.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=base.BATCH_SIZE)
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs (order alternates)")
    parser.add_argument("--workdir", type=Path, help="keep the generated source here")
    parser.add_argument("--verify-only", type=Path, help="only time verify of an audited run's directory")
    parser.add_argument("--child", choices=("flow", "verify"), help=argparse.SUPPRESS)
    parser.add_argument("--where", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child_flow(args.where) if args.child == "flow" else child_verify(args.where)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return

    if args.verify_only:
        checked = run_child("verify", args.verify_only.resolve(), {**os.environ})
        print(f"verify {checked['events']:,} events: {checked['seconds']:.2f} s wall, {checked['cpu_seconds']:.2f} s "
              f"CPU ({checked['events'] / checked['cpu_seconds']:,.0f} events per CPU second), "
              f"{'intact' if checked['ok'] else 'NOT intact'}")
        return
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="crmbridge-audit-bench-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CRMBRIDGE_HOME": str(workdir / "crmbridge-home")}
    env.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    print(f"audit benchmark: {args.rows:,} rows, batch size {args.batch_size:,}, {os.cpu_count()} CPUs, "
          f"work dir {workdir}", flush=True)
    times: dict[str, list[float]] = {"off": [], "on": []}
    cpus: dict[str, list[float]] = {"off": [], "on": []}
    last_on: Path | None = None
    events_on = 0
    for pair in range(args.repeat):
        for mode in (("off", "on") if pair % 2 == 0 else ("on", "off")):
            where = prepare(workdir, args.rows, args.batch_size, mode)
            result = run_child("flow", where, env)
            if result["created"] != args.rows:
                raise SystemExit(f"audit {mode}: created {result['created']:,} of {args.rows:,} rows")
            times[mode].append(result["seconds"])
            cpus[mode].append(result["cpu_seconds"])
            print(f"  audit {mode:>3}: {result['seconds']:7.2f} s, {args.rows / result['seconds']:9,.0f} rows/s, "
                  f"{result['cpu_seconds']:7.2f} CPU s (flow + writer), {result['events']:,} audit events", flush=True)
            if mode == "on":
                last_on, events_on = where, result["events"]
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"\nrecord-level audit overhead: {on / off:.3f}x the run without it ({(on / off - 1) * 100:+.1f}%; "
          f"median of {args.repeat}; aim: under +10%)")
    print(f"  audit cost per record event: {(on - off) / max(events_on, 1) * 1e6:.2f} us wall")
    cpu_off, cpu_on = statistics.median(cpus["off"]), statistics.median(cpus["on"])
    print(f"  CPU: {cpu_on / cpu_off:.3f}x ({(cpu_on - cpu_off) / max(events_on, 1) * 1e6:.2f} us of CPU per record "
          "event, flow and writer process together; the writer's share runs on the other core)")
    assert last_on is not None
    checked = run_child("verify", last_on, env)
    print(f"verify {checked['events']:,} events and {checked['checkpoints']} checkpoint(s): "
          f"{checked['seconds']:.2f} s ({checked['events'] / checked['seconds']:,.0f} events/s; "
          f"{checked['cpu_seconds']:.2f} s of CPU, which a busy machine does not inflate), "
          f"{'intact' if checked['ok'] else 'NOT intact'}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
