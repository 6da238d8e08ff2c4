"""Benchmark: the cleansing vocabulary, vectorised, against a naive per-row `DataFrame.apply`, in one run.

    python bench/cleanse.py                        # 1,000,000 rows
    python bench/cleanse.py --rows 200000 --distinct 0.5

Both sides do the same work on the same generated legacy rows, in batches of the mapping's default size:

  name     trim + name-aware case (`name_case`)
  phone    `phone` with region CN, E.164 (phonenumbers), invalid numbers refused
  email    `email` (email-validator, syntax only) then lower-case
  date     `date` with order DMY (several spellings; impossible dates refused)
  segment  `map` through an inline lookup table

The vectorised side runs the transforms as a mapping runs them (`transforms.apply_checked` per column).
The baseline calls the same libraries once per row inside `DataFrame.apply(axis=1)`. Both outputs are
compared value by value before any number is printed. Only rates and ratios are printed, never asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
from collections import defaultdict

import email_validator
import pandas as pd
import phonenumbers

from crmbridge.mappings import transforms
from crmbridge.mappings.dates import formats_for
from crmbridge.mappings.text_transforms import name_case

SEGMENTS = {"VIP": "key_account", "A": "key_account", "B": "standard", "C": "standard", "普通": "standard",
            "重要": "key_account", "D": "dormant"}
STEPS = {
    "name": [("trim", None), ("name_case", None)],
    "phone": [("phone", {"region": "CN"})],
    "email": [("email", None), ("lower", None)],
    "date": [("date", {"order": "DMY"})],
    "segment": [("map", {"values": SEGMENTS, "unmapped": "keep"})],
}


def generate(rows: int, distinct: float, seed: int = 7) -> pd.DataFrame:
    """Legacy-looking rows; each column draws from a pool of `distinct * rows` values, as exports repeat."""
    rng = random.Random(seed)
    pool = max(10, int(rows * distinct))
    given = ["wei", "FANG", " Anna", "ronald", "JOSÉ", "o'brien", "maría", "hans ", "Li", "SEAN"]
    family = ["MCDONALD", "van der berg", "Wang", "schmidt ", "ÁLVAREZ", "de la cruz", "Zhang", "O'NEIL", "Müller"]
    names = [f"  {rng.choice(given)}   {rng.choice(family)} " for _ in range(pool)]
    prefixes = ["138", "139", "186", "150", "021", "010"]
    phones = []
    for _ in range(pool):
        digits = f"{rng.choice(prefixes)}{rng.randrange(10**8):08d}"
        shape = rng.randrange(5)
        phones.append([digits, f"+86 {digits[:3]} {digits[3:7]} {digits[7:]}", f"({digits[:3]}) {digits[3:]}",
                       f"{digits[:3]}-{digits[3:7]}-{digits[7:]}", digits[:6]][shape])  # the last is invalid
    domains = ["example.com", "EXAMPLE.CN", "mail.example.org", "qq.com", "163.com"]
    emails = [f"User.{i}@{rng.choice(domains)}" if i % 50 else f"broken{i}@" for i in range(pool)]
    dates = []
    for _ in range(pool):
        day = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(25000))
        dates.append(rng.choice([f"{day:%d/%m/%Y}", f"{day:%d.%m.%Y}", f"{day:%Y-%m-%d}",
                                 f"{day.year}年{day.month}月{day.day}日", "31/04/2001"]))
    segments = [*SEGMENTS, "E", "x"]
    return pd.DataFrame({
        "name": [rng.choice(names) for _ in range(rows)],
        "phone": [rng.choice(phones) for _ in range(rows)],
        "email": [rng.choice(emails) for _ in range(rows)],
        "date": [rng.choice(dates) for _ in range(rows)],
        "segment": [rng.choice(segments) for _ in range(rows)],
    }, dtype=object)


# --- the vectorised side -----------------------------------------------------------------------------------


def vectorised(frame: pd.DataFrame, timings: dict[str, float]) -> pd.DataFrame:
    out = {}
    for column, steps in STEPS.items():
        values = frame[column]
        started = time.perf_counter()
        for name, argument in steps:
            result = transforms.apply_checked(values, name, argument)
            values = result.values
            for rejection in result.rejections:
                if rejection.severity == "reject":
                    values = values.astype(object).where(~rejection.invalid.to_numpy(dtype=bool), None)
        timings[column] += time.perf_counter() - started
        out[column] = values.astype(object)
    return pd.DataFrame(out)


# --- the naive side: the same libraries, once per row ------------------------------------------------------

_DMY = formats_for("DMY")


def _naive_phone(value: str) -> str | None:
    try:
        number = phonenumbers.parse(value, "CN")
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _naive_email(value: str) -> str | None:
    try:
        return email_validator.validate_email(value.strip(), check_deliverability=False).normalized.lower()
    except (email_validator.EmailNotValidError, ValueError, UnicodeError):
        return None


def _naive_date(value: str) -> str | None:
    text = value.strip()
    for fmt in _DMY:
        try:
            parsed = dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
        if "%y" in fmt and parsed.year % 100 > 68:
            parsed = parsed.replace(year=parsed.year - 100)
        return parsed.strftime("%Y-%m-%d")
    return None


def _naive_row(row: pd.Series) -> pd.Series:
    segment = row["segment"].strip()
    return pd.Series({
        "name": name_case(row["name"].strip()),
        "phone": _naive_phone(row["phone"]),
        "email": _naive_email(row["email"]),
        "date": _naive_date(row["date"]),
        "segment": SEGMENTS.get(segment, row["segment"]),
    })


def naive(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(_naive_row, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--distinct", type=float, default=0.2,
                        help="distinct values per column as a share of the rows (default 0.2)")
    parser.add_argument("--batch-size", type=int, default=50_000)
    parser.add_argument("--baseline-rows", type=int, default=100_000,
                        help="rows the naive baseline runs on (the first N; its rate does not depend on N, and "
                        "1,000,000 rows take it half an hour); 0 for all")
    args = parser.parse_args()

    frame = generate(args.rows, args.distinct)
    print(f"{args.rows:,} rows, about {args.distinct:.0%} distinct values per column, batches of "
          f"{args.batch_size:,}", flush=True)
    batches = [frame.iloc[i:i + args.batch_size] for i in range(0, len(frame), args.batch_size)]
    transforms.registry()  # load the vocabulary before timing

    timings: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    fast = pd.concat([vectorised(b, timings) for b in batches], ignore_index=True)
    fast_seconds = time.perf_counter() - started

    sample = frame if not args.baseline_rows else frame.iloc[:args.baseline_rows]
    started = time.perf_counter()
    slow = pd.concat([naive(sample.iloc[i:i + args.batch_size]) for i in range(0, len(sample), args.batch_size)],
                     ignore_index=True)
    slow_seconds = time.perf_counter() - started
    fast_rate, slow_rate = args.rows / fast_seconds, len(sample) / slow_seconds

    for column in STEPS:
        a = [None if pd.isna(v) else v for v in fast[column].tolist()]
        b = [None if pd.isna(v) else v for v in slow[column].tolist()]
        a = a[:len(b)]
        differ = sum(x != y for x, y in zip(a, b, strict=True))
        if differ:
            raise SystemExit(f"the two sides disagree on {differ} `{column}` values; no numbers printed")

    print(f"vectorised:     {fast_seconds:8.1f} s  {fast_rate:12,.0f} rows/s  ({args.rows:,} rows)")
    print(f"naive apply:    {slow_seconds:8.1f} s  {slow_rate:12,.0f} rows/s  ({len(sample):,} rows; outputs equal)")
    print(f"ratio:          {fast_rate / slow_rate:8.1f}x  (vectorised / naive, rows/s)")
    print("where the vectorised time goes:")
    for column, seconds in sorted(timings.items(), key=lambda item: -item[1]):
        print(f"  {column:8} {seconds:7.2f} s  {seconds / fast_seconds:5.0%}  "
              f"{' + '.join(name for name, _ in STEPS[column])}")
    refused = {c: int(fast[c].isna().sum()) for c in ("phone", "email", "date")}
    print(f"refused (would be quarantined): {refused}")


if __name__ == "__main__":
    main()
