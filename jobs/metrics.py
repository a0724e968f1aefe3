"""What the scheduler tick records for Prometheus (served by the control plane's /metrics).

Counters and a histogram only: in multiprocess mode (factory_saas.metrics) their values from
every worker process add up, whichever process ran the tick.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Counter, Histogram

from jobs.scheduler.types import Decisions

TICK_SECONDS = Histogram(
    "factory_scheduler_tick_seconds",
    "Time one scheduler pass took (reap, snapshot, decide, apply), passes that ran only.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
TICKS = Counter(
    "factory_scheduler_ticks",
    "Scheduler ticks by outcome: ran, locked (another pass held the lock), failed.",
    ["outcome"],
)
PLACEMENTS = Counter(
    "factory_scheduler_placements",
    "Placements the scheduler decided (a job cancelled between snapshot and apply is skipped).",
)
PREEMPTIONS = Counter(
    "factory_scheduler_preemptions", "Running jobs the scheduler preempted to reclaim slots."
)
for _outcome in ("ran", "locked", "failed"):
    TICKS.labels(_outcome)


def tick_observed(scheduler_pass: Callable[[], Decisions | None]) -> Decisions | None:
    """Run one scheduler pass and record its outcome, duration and decisions."""
    started = time.perf_counter()
    try:
        decisions = scheduler_pass()
    except Exception:
        TICKS.labels("failed").inc()
        raise
    if decisions is None:
        TICKS.labels("locked").inc()
        return None
    TICK_SECONDS.observe(time.perf_counter() - started)
    TICKS.labels("ran").inc()
    PLACEMENTS.inc(len(decisions.placements))
    PREEMPTIONS.inc(len(decisions.preemptions))
    return decisions
