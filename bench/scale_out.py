"""The same SQLite -> SQLite migration in one process and with batches prepared and written on a local Dask
cluster.

    .venv/bin/python bench/scale_out.py                 # 2,000,000 rows, 2 Dask workers
    .venv/bin/python bench/scale_out.py --rows 500000 --workers 2

Each measurement runs in a child process of its own against one persistent local Prefect server (Dask
workers must reach a Prefect API), started for the benchmark and stopped at the end. It prints both times,
the speed-up, the flow process's peak RSS and the largest Dask worker's peak RSS, and checks that both runs
loaded every row and reconciled alike. The source and the mapping are those of bench/migrate_sqlite.py.
For memory against row count in one process, run `bench/migrate_sqlite.py --rows 5000000 --also 1000000
--only flow`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import migrate_sqlite  # the shared source generator and mapping

RESULT_MARK = "SCALE-OUT-RESULT "


def child(where: Path, dask: str | None) -> None:
    from crmbridge.flows.prefect_env import configure_prefect

    configure_prefect()  # the benchmark's persistent server, through PREFECT_API_URL
    from crmbridge.flows import migrate

    began = time.perf_counter()
    _, result = migrate.start_run(where / "mapping.yaml", dask=dask)
    seconds = time.perf_counter() - began
    # ru_maxrss is in KiB on Linux. RUSAGE_CHILDREN is the largest of the processes this one started and
    # waited for: with --dask those are the cluster's nannies and workers, the server runs elsewhere.
    print(RESULT_MARK + json.dumps({
        "seconds": seconds,
        "flow_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if dask else None,
        "copied": migrate_sqlite._count(where / "target_flow.db", "customer"),
        "entities": result["entities"],
    }), flush=True)


def run_child(where: Path, dask: str | None, env: dict) -> dict:
    for name in ("target_flow.db",):
        (where / name).unlink(missing_ok=True)
    shutil.rmtree(where / "state", ignore_errors=True)
    command = [sys.executable, __file__, "--child", "--where", str(where)] + (["--dask", dask] if dask else [])
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the {'Dask' if dask else 'single-process'} run failed (exit code {done.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=migrate_sqlite.BATCH_SIZE)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--where", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dask", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.where, args.dask)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="crmbridge-scale-out-"))
    home = Path(tempfile.mkdtemp(prefix="crmbridge-scale-out-home-"))
    env = {**os.environ, "CRMBRIDGE_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    os.environ.update({k: env[k] for k in ("CRMBRIDGE_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")})
    from crmbridge.flows.prefect_env import start_server, stop_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    print(f"crmbridge scale-out benchmark: {args.rows:,} rows, batch size {args.batch_size:,}, "
          f"{args.workers} Dask workers, {os.cpu_count()} CPUs; work dir {workdir}", flush=True)
    server = start_server(port)
    env["PREFECT_API_URL"] = server.api_url
    try:
        where = migrate_sqlite.prepare(workdir, args.rows, args.batch_size)
        single = run_child(where, None, env)
        print(f"  single process: {single['seconds']:.1f} s", flush=True)
        dask = run_child(where, f"local:{args.workers}", env)
        print(f"  Dask, {args.workers} workers: {dask['seconds']:.1f} s", flush=True)
    finally:
        stop_server()
        shutil.rmtree(home, ignore_errors=True)
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    for name, result in (("single process", single), ("Dask", dask)):
        if result["copied"] != args.rows:
            raise SystemExit(f"{name}: {result['copied']:,} of {args.rows:,} rows in the target")
    if single["entities"] != dask["entities"]:
        raise SystemExit("the two runs reconciled differently")
    print()
    print(f"{'':28}{'seconds':>10}{'rows/s':>12}{'flow RSS':>12}{'worker RSS':>13}")
    for label, result in (("single process", single), (f"Dask, {args.workers} local workers", dask)):
        worker = f"{result['worker_rss_mib']:.0f} MiB" if result["worker_rss_mib"] else "-"
        print(f"{label:28}{result['seconds']:>10.1f}{args.rows / result['seconds']:>12,.0f}"
              f"{result['flow_rss_mib']:>8.0f} MiB{worker:>13}")
    print(f"speed-up with Dask: {single['seconds'] / dask['seconds']:.2f}x (above 1 Dask is faster); "
          "both runs reconciled alike")
    print("On the workers: batch preparation (cleanse, validate, protect) and target writes; in the flow process: "
          "extract, staging, load planning and the ledger. A SQLite target takes one writer at a time "
          "(docs/scale-out.md).")


if __name__ == "__main__":
    main()
