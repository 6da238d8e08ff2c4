"""Retrying transient faults: exponential backoff with full jitter, a bounded number of attempts.

Only calls that are safe to repeat go through here (an upsert keyed by external id, a lookup, an HTTP
request the server did not act on); a permanent fault is never retried, so it fails fast.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("crmbridge.retry")

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    attempts: int = 5  # in all, the first try included
    base: float = 0.5  # seconds before the second attempt (at most; jitter picks below it)
    cap: float = 30.0  # no wait is longer than this

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Full jitter (a uniform draw below the exponential bound): retries of many workers spread out."""
        bound = min(self.cap, self.base * 2 ** retry)
        return (rng or random).uniform(0, bound)


class GaveUp(Exception):
    """Every attempt failed with a transient fault; `last` is the final one."""

    def __init__(self, attempts: int, last: BaseException):
        super().__init__(f"{attempts} attempts failed")
        self.attempts = attempts
        self.last = last


def retrying(call: Callable[[], T], *, transient: Callable[[BaseException], bool], what: str,
             backoff: Backoff = Backoff(), before_retry: Callable[[], None] | None = None,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `call`; on a transient fault wait and try again (after `before_retry`, e.g. a reconnect).

    A permanent fault propagates at once; when every attempt fails, raises GaveUp. `what` names the call in
    the log line (never values)."""
    for attempt in range(backoff.attempts):
        try:
            return call()
        except Exception as error:
            if not transient(error):
                raise
            if attempt == backoff.attempts - 1:
                raise GaveUp(backoff.attempts, error) from error
            wait = backoff.delay(attempt)
            log.warning("%s: transient %s, attempt %d of %d, retrying in %.1fs", what, type(error).__name__,
                        attempt + 1, backoff.attempts, wait)
            if before_retry is not None:
                before_retry()
            sleep(wait)
    raise AssertionError("unreachable")
