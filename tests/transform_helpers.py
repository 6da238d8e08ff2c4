"""Helpers of the transform tests: run a transform over a list of values, or list what it refused."""

from __future__ import annotations

import pandas as pd

from crmbridge.mappings import transforms


def run(name: str, values: list, argument=None, others: dict | None = None) -> list:
    series = pd.Series(values, dtype=object)
    result = transforms.apply(series, name, argument,
                              {k: pd.Series(v, dtype=object) for k, v in (others or {}).items()})
    return [None if pd.isna(v) else v for v in result.tolist()]


def rejected(name: str, values: list, argument=None, others: dict | None = None) -> list[tuple[bool, str]]:
    result = transforms.apply_checked(pd.Series(values, dtype=object), name, argument,
                                      {k: pd.Series(v, dtype=object) for k, v in (others or {}).items()})
    flags = [False] * len(values)
    codes = [""] * len(values)
    for rejection in result.rejections:
        for i, hit in enumerate(rejection.invalid.tolist()):
            if hit:
                flags[i], codes[i] = True, rejection.code
    return list(zip(flags, codes, strict=True))
