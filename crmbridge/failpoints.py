"""Named crash points, so the kill-and-resume tests can stop a run exactly where a real crash could.

Set `CRMBRIDGE_FAILPOINT=<name>[:<n>]` and the process kills itself with SIGKILL (no cleanup, no `finally`,
like a power cut or the OOM killer) the n-th time (default: the first) it reaches that point. Unset, a
check costs one dictionary lookup. `POINTS` lists every name the flow reaches.
"""

from __future__ import annotations

import os
import signal

POINTS = (
    "stage.after_batch",  # a batch is committed to staging
    "stage.after_entity",  # every batch of an entity staged, before dedupe
    "dedupe.after",  # duplicates and matches settled, before the target is prepared
    "load.before_write",  # a load batch is planned (journal written), nothing sent to the target yet
    "load.after_write",  # the target committed the batch; the ledger does not know yet
    "load.after_ledger",  # the ledger holds the batch
    "reconcile.before",  # every batch loaded, reconciliation not written
)

_hits: dict[str, int] = {}


def _wanted() -> tuple[str, int] | None:
    spec = os.environ.get("CRMBRIDGE_FAILPOINT")
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count or 1)


def reach(name: str) -> None:
    """Mark that the run reached `name`; kills the process when the environment asks for it here."""
    wanted = _wanted()
    if wanted is None or wanted[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == wanted[1]:
        os.kill(os.getpid(), signal.SIGKILL)
