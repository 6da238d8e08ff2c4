"""Benchmark: the cost of field protection in a whole migration, in one run.

    python bench/protect.py                      # 1,000,000 rows
    python bench/protect.py --rows 200000 --receives ciphertext --repeat 2

The same SQLite -> SQLite migration as bench/migrate_sqlite.py (its generator and mapping), twice, each in a
fresh subprocess with the same Prefect configuration:

  plain      no protection
  protected  `name` and `phone` encrypted (AES-256-GCM), `email` blind-indexed (HMAC-SHA256 token column
             plus the value encrypted), staging holds envelopes, the target gets plaintext decrypted at the
             last moment (or ciphertext with --receives ciphertext)

It prints the overhead ratio (protected / plain, steady state and end to end) and the cost per protected
field value, from the flow difference and from a direct in-process measurement of encrypt/decrypt on one
batch (best of three), and the load average next to each measurement. Only ratios and rates are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import migrate_sqlite as base  # noqa: E402  (the generator, mapping and flow measurement)

PROTECT = {"name": "encrypt", "phone": "encrypt", "email": "blind_index"}
ENV_KEY = "BENCH_PROTECT_MASTER_KEY"


def protected_mapping(text: str, receives: str) -> str:
    mapping = yaml.safe_load(text)
    mapping["protection"] = {"keyring": "keys/ring.json", "master_key_env": ENV_KEY}
    mapping["targets"]["crm"]["receives"] = receives
    for name, policy in PROTECT.items():
        mapping["entities"][0]["fields"][name]["protect"] = policy
    return yaml.safe_dump(mapping, sort_keys=False)


def prepare(workdir: Path, rows: int, batch_size: int, receives: str) -> dict[str, Path]:
    source = workdir / f"source-{rows}.db"
    if not source.exists():
        began = time.perf_counter()
        base.generate_source(source, rows)
        print(f"  generated {rows:,} source rows in {time.perf_counter() - began:.1f} s", flush=True)
    text = base.MAPPING.format(batch_size=batch_size)
    places = {}
    for kind in ("plain", "protected"):
        where = workdir / kind
        if where.exists():
            import shutil

            shutil.rmtree(where)
        where.mkdir(parents=True)
        (where / "source.db").symlink_to(source)
        (where / "mapping.yaml").write_text(text if kind == "plain" else protected_mapping(text, receives))
        places[kind] = where
    from crmbridge.protection.keyring import Keyring, MasterKeySealer

    Keyring.create(places["protected"] / "keys" / "ring.json", MasterKeySealer.from_text(os.environ[ENV_KEY]))
    return places


def run_child(where: Path, rows: int, env: dict) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--where", str(where)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(base.RESULT_MARK)]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the measurement in {where} failed (exit code {done.returncode})")
    result = json.loads(lines[-1][len(base.RESULT_MARK):])
    if result["copied"] != rows:
        raise SystemExit(f"{where.name}: copied {result['copied']:,} of {rows:,} rows")
    return result


def direct_costs(where: Path, batch: int, repeat: int = 3) -> dict[str, float]:
    """µs per value of each primitive as the flow calls it, on one batch of the protected mapping's rows (the
    best of `repeat` runs: the machine is shared)."""
    import pandas as pd

    from crmbridge.mappings import load_mapping
    from crmbridge.protection import blind_index
    from crmbridge.protection.policy import protector_for

    mapping = load_mapping(where / "mapping.yaml")
    entity = mapping.entity("customers")
    protector = protector_for(mapping)
    values = [f"Customer Name {i:07d}" for i in range(batch)]
    exts = [f"{i:032x}" for i in range(batch)]
    text = pd.Series(values, dtype="string[pyarrow]")  # cleansed frames hold Arrow-backed strings
    frame = pd.DataFrame({"_ext": exts, **{name: text for name in entity.fields if name in PROTECT},
                          "email_bidx": [None] * batch})
    sealed = protector.encrypt_values("customers", "name", values, exts)
    index_key = protector.keyring.index_key("customers", "email")
    cipher = protector.keyring.gcm(protector.keyring.current("data").id)
    nonces, plain = [os.urandom(12) for _ in values], [v.encode() for v in values]
    bound = [b"\1\0\0\0\1customers\0name\0" + ext.encode() for ext in exts]
    bodies = list(map(cipher.encrypt, nonces, plain, bound))
    copy = HMAC(index_key, hashes.SHA256()).copy
    work = {
        "encrypt": lambda: protector.encrypt_values("customers", "name", values, exts),
        "decrypt": lambda: protector.decrypt_values("customers", "name", sealed, exts),
        "blind index": lambda: blind_index.tokens(index_key, values),
        "protect_frame (3 fields)": lambda: protector.protect_frame(entity, frame),
        # the floor: the cryptography calls alone, no envelope, base64 or Arrow around them
        "AESGCM.encrypt alone": lambda: list(map(cipher.encrypt, nonces, plain, bound)),
        "AESGCM.decrypt alone": lambda: list(map(cipher.decrypt, nonces, bodies, bound)),
        "HMAC-SHA256 alone": lambda: [_mac(copy, v) for v in plain],
    }
    out: dict[str, float] = {}
    for name, run in work.items():
        best = float("inf")
        for _ in range(repeat):
            began = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - began)
        out[name] = best / batch * 1e6
    return out


def _mac(copy, value: bytes) -> bytes:
    one = copy()
    one.update(value)
    return one.finalize()


def staging_costs(places: dict[str, Path], batch: int, batches: int = 4) -> dict[str, tuple[float, float]]:
    """CPU µs per row to stage `batches` batches of the entity's rows and read them back for loading, with the
    plain and the protected mapping (envelopes and tokens make staged rows some 270 bytes wider)."""
    import pandas as pd

    from crmbridge.mappings import load_mapping
    from crmbridge.protection.policy import protector_for
    from crmbridge.staging import Staging

    numbers = range(batch)
    rows = {"_row": numbers, "_key": [str(i) for i in numbers], "_ext": [f"{i:032x}" for i in numbers],
            "name": [f"Customer Name {i:07d}" for i in numbers], "email": [f"c{i}@example.com" for i in numbers],
            "phone": [f"555{i:07d}" for i in numbers], "city": ["Berlin"] * batch, "balance": ["12.50"] * batch,
            "signup_date": [pd.Timestamp("2020-01-01").date()] * batch}
    out = {}
    for kind, where in places.items():
        mapping = load_mapping(where / "mapping.yaml")
        entity = mapping.entity("customers")
        frame = pd.DataFrame({name: pd.Series(values, dtype="string[pyarrow]") if name not in ("_row", "signup_date")
                              else values for name, values in rows.items()})
        frame = frame.reindex(columns=["_row", "_key", "_ext", *entity.fields])
        if kind == "protected":
            frame = protector_for(mapping).protect_frame(entity, frame.astype({"email_bidx": "string[pyarrow]"}))
        with tempfile.TemporaryDirectory() as scratch:
            staging = Staging(Path(scratch) / "staging.duckdb")
            staging.create_rows_table(entity)
            began = time.process_time()
            for b in range(batches):
                numbered = frame.assign(_row=range(b * batch, (b + 1) * batch))
                staging.stage_batch(entity, b, b * batch, numbered, batch, [])
            staged = time.process_time() - began
            began = time.process_time()
            for b in range(batches):
                staging.rows_for_load_arrow(entity, b * batch, (b + 1) * batch - 1)
            read = time.process_time() - began
            staging.close()
        out[kind] = (staged / (batches * batch) * 1e6, read / (batches * batch) * 1e6)
    return out


def load_average() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _count_steady_cpu() -> dict[str, float]:
    """Note this process's CPU time where the flow's progress clock notes the steady state's start and end.
    On a shared machine the CPU time a flow uses varies far less than its wall-clock time."""
    noted: dict[str, float] = {}
    stage, advance = base._Clock.stage, base._Clock.advance

    def noting_stage(self, entity: str, name: str, total: int | None = None) -> None:
        if name == "extract":
            noted.setdefault("first", time.process_time())
        stage(self, entity, name, total)

    def noting_advance(self, entity: str, name: str, rows: int) -> None:
        if name == "load":
            noted["last"] = time.process_time()
        advance(self, entity, name, rows)

    base._Clock.stage, base._Clock.advance = noting_stage, noting_advance
    return noted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=base.BATCH_SIZE)
    parser.add_argument("--receives", choices=("plaintext", "ciphertext"), default="plaintext")
    parser.add_argument("--repeat", type=int, default=1, help="measure each mapping this many times, "
                        "alternating the order; the best time of each counts")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--where", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import resource

        cpu = _count_steady_cpu()
        result = base.measure_flow(args.where)
        result["steady_cpu_s"] = cpu["last"] - cpu["first"]
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(base.RESULT_MARK + json.dumps(result), flush=True)
        return

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="crmbridge-bench-protect-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault(ENV_KEY, base64.b64encode(os.urandom(32)).decode())
    env = {**os.environ, "CRMBRIDGE_HOME": str(workdir / "crmbridge-home")}
    env.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # a busy machine starts it slowly
    print(f"crmbridge protection benchmark: {args.rows:,} rows, batch {args.batch_size:,}, target receives "
          f"{args.receives}; {os.cpu_count()} CPUs, {load_average()}; work dir {workdir}", flush=True)
    places = prepare(workdir, args.rows, args.batch_size, args.receives)
    results: dict[str, list[dict]] = {"plain": [], "protected": []}
    for round_no in range(args.repeat):
        order = ("plain", "protected") if round_no % 2 == 0 else ("protected", "plain")
        for kind in order:
            places = prepare(workdir, args.rows, args.batch_size, args.receives) if round_no else places
            result = run_child(places[kind], args.rows, env)
            results[kind].append(result)
            print(f"  {kind:<10} steady {result['steady_s']:7.2f} s ({result['steady_cpu_s']:6.2f} s CPU), "
                  f"end to end {result['total_s']:7.2f} s, "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB, {load_average()}", flush=True)
    plain = min(results["plain"], key=lambda r: r["steady_s"])
    protected = min(results["protected"], key=lambda r: r["steady_s"])
    fields = len(PROTECT)
    per_value = (protected["steady_s"] - plain["steady_s"]) / (args.rows * fields) * 1e6
    print(f"\n== {args.rows:,} rows, {fields} protected fields ({', '.join(f'{k}: {v}' for k, v in PROTECT.items())})")
    print(f"  overhead, steady state (first batch read to last loaded): "
          f"{protected['steady_s'] / plain['steady_s']:.3f}x  ({plain['steady_s']:.2f} s -> "
          f"{protected['steady_s']:.2f} s)")
    plain_cpu = min(r["steady_cpu_s"] for r in results["plain"])
    protected_cpu = min(r["steady_cpu_s"] for r in results["protected"])
    print(f"  overhead, steady state in CPU time of the flow process:   {protected_cpu / plain_cpu:.3f}x  "
          f"({plain_cpu:.2f} s -> {protected_cpu:.2f} s; "
          f"{(protected_cpu - plain_cpu) / (args.rows * fields) * 1e6:.2f} µs per protected field value)")
    print(f"  overhead, end to end:                                    "
          f"{protected['total_s'] / plain['total_s']:.3f}x  ({plain['total_s']:.2f} s -> {protected['total_s']:.2f} s)")
    print(f"  flow difference per protected field value: {per_value:.2f} µs (all work protection adds: "
          "encrypt, token, wider staging rows, decrypt at load)")
    for name, micros in direct_costs(places["protected"], min(args.batch_size, 50_000)).items():
        print(f"  direct, {name:<26} {micros:6.2f} µs per value")
    staging = staging_costs(places, min(args.batch_size, 50_000))
    for kind, (staged, read) in staging.items():
        print(f"  staging, {kind:<10} stage {staged:5.2f} µs per row, read for loading {read:5.2f} µs per row (CPU)")
    print(f"  reconciliation: plain {plain['buckets']}, protected {protected['buckets']}")
    print(f"  at the end: {load_average()}")


if __name__ == "__main__":
    main()
