"""Dedupe in parts (crmbridge.dedupe.partition): each blocking rule's rows split by block code into jobs a
worker can run alone. The pairs and similarities must be exactly the single pass's, for any part count."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_dedupe_matching import COLUMNS, FEBRL3, FEBRL3_CSV, PEOPLE

from crmbridge.dedupe import Matcher
from crmbridge.dedupe.partition import PartJob, compared_pairs, part_jobs


@pytest.fixture(scope="module")
def febrl3() -> pd.DataFrame:
    return pd.read_csv(FEBRL3_CSV, dtype=str, skipinitialspace=True).rename(columns=str.strip)


def _single_pass(spec, frame: pd.DataFrame):
    matcher, memo = Matcher(spec), {}
    matcher.prepare(frame, memo)
    i, j, stats = matcher.candidates(frame, memo)
    return i, j, matcher.similarities(i, j), stats


@pytest.mark.parametrize("parts", [1, 2, 7])
def test_parts_give_exactly_the_single_pass_pairs_and_similarities(febrl3: pd.DataFrame, parts: int) -> None:
    i, j, sims, stats = _single_pass(FEBRL3, febrl3)
    pi, pj, psims, pstats = compared_pairs(FEBRL3, febrl3, parts)
    assert len(i) > 10_000
    assert np.array_equal(pi, i) and np.array_equal(pj, j)
    assert np.array_equal(psims, sims, equal_nan=True)
    assert pstats == {"pairs_generated": stats["pairs_generated"],
                      "rows_in_skipped_blocks": stats["rows_in_skipped_blocks"]}


def test_every_block_lies_whole_in_one_part(febrl3: pd.DataFrame) -> None:
    jobs = list(part_jobs(FEBRL3, febrl3, 4, {}))
    for rule in {job.rule for job in jobs}:
        mine: list[PartJob] = [job for job in jobs if job.rule == rule]
        codes = [set(job.codes.tolist()) for job in mine]
        assert sum(len(c) for c in codes) == len(set().union(*codes))  # no block code in two parts
        assert all(np.all(np.diff(job.rows) > 0) for job in mine)
        assert all(len(job.frame) == len(job.rows) for job in mine)
    assert len(jobs) <= 4 * (len(FEBRL3.blocking) + len(FEBRL3.rules))


def test_the_whole_match_through_parts_equals_the_single_pass(febrl3: pd.DataFrame) -> None:
    from crmbridge.dedupe.partition import matcher_pairs

    expected = Matcher(FEBRL3).run(febrl3)
    matcher = Matcher(FEBRL3)
    got = matcher.run(febrl3, pairs=matcher_pairs(matcher, 3))
    assert np.array_equal(got.labels, expected.labels)
    assert np.array_equal(got.score, expected.score)
    assert got.stats["pairs_compared"] == expected.stats["pairs_compared"]


def test_no_pairs_and_tiny_inputs() -> None:
    frame = pd.DataFrame({c: pd.Series([], dtype=object) for c in COLUMNS})
    i, j, sims, stats = compared_pairs(PEOPLE, frame, 3)
    assert len(i) == len(j) == len(sims) == 0 and sims.shape[1] == len(PEOPLE.compare)
    assert stats["pairs_generated"] == 0
