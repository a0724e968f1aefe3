"""The scheduler core: a pure function from a pool snapshot to placement decisions.

`schedule` is the policy (docs/architecture.md, "Scheduling policy"); `fifo_schedule` is the
FIFO baseline the benchmarks compare it with. Loading snapshots and applying decisions live
beside them.
"""

from .fifo import fifo_schedule
from .policy import schedule
from .types import (
    Decisions,
    Machine,
    Placement,
    Preemption,
    Queued,
    Quota,
    Reservation,
    Running,
    Snapshot,
    Tenant,
    Waiting,
)

__all__ = [
    "Decisions",
    "Machine",
    "Placement",
    "Preemption",
    "Queued",
    "Quota",
    "Reservation",
    "Running",
    "Snapshot",
    "Tenant",
    "Waiting",
    "fifo_schedule",
    "schedule",
]
