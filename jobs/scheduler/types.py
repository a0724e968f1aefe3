"""The scheduler's vocabulary: the snapshot it reads and the decisions it returns.

Plain frozen dataclasses with no Django in them, so the same policy runs in the scheduler tick,
in unit tests and in the trace-replay simulator.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Machine:
    id: int
    resource_class: str
    slots: int  # GPU slot indices are 0..slots-1
    free: frozenset[int]  # currently free slot indices
    schedulable: bool = True  # False when cordoned, draining or offline: place nothing new
    runtimes: frozenset[str] = frozenset()  # names of the working runtimes the worker reported


@dataclass(frozen=True, slots=True)
class Running:
    job_id: int
    tenant_id: int
    resource_class: str
    gpus: int
    machine_id: int
    priority: int
    started_at: float  # epoch seconds
    expected_end: float  # started_at + max_runtime_s (used for reservations/backfill)


@dataclass(frozen=True, slots=True)
class Queued:
    job_id: int
    tenant_id: int
    resource_class: str
    gpus: int
    priority: int  # higher runs first within a tenant
    submitted_at: float
    max_runtime_s: float
    runtime: str = ""  # the Python environment it needs; "" (recipes) runs on any machine


@dataclass(frozen=True, slots=True)
class Quota:
    guaranteed: int  # GPUs always available to the tenant in this class
    limit: int  # the most it may hold in this class (borrowing idle capacity)


@dataclass(frozen=True, slots=True)
class Tenant:
    id: int
    quotas: Mapping[str, Quota]  # per resource class; a missing class means no access
    weight: float = 1.0
    max_running_jobs: int | None = None
    usage: float = 0.0  # decayed recent spend in money units (GPU-seconds x class price)
    budget_ok: bool = True  # False: budget hard cap reached or past due -> no new placements
    block_reason: str = ""  # why budget_ok is False, as the waiting jobs show it
    label: str = ""  # human name for reasons, may be empty


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    machines: tuple[Machine, ...]
    running: tuple[Running, ...]
    queued: tuple[Queued, ...]
    tenants: Mapping[int, Tenant]
    prices: Mapping[str, float]  # money per GPU-second per resource class


@dataclass(frozen=True, slots=True)
class Placement:
    job_id: int
    machine_id: int
    slots: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Preemption:
    job_id: int  # the running victim
    for_job_id: int  # the queued job it makes room for
    reason: str  # e.g. "reclaimed for acme's guaranteed a100-40gb share"


@dataclass(frozen=True, slots=True)
class Reservation:
    """A machine held for a waiting job. The job stores this, not its reason's ETA: the shadow
    time stays put from tick to tick while "expected in ~N min" counts down."""

    waiting_for: str  # the reason without the reservation ("waiting for 4 free h100 on ...")
    machine_id: int
    expected_at: float  # epoch seconds when enough slots are expected to be free


@dataclass(frozen=True, slots=True)
class Waiting:
    job_id: int
    reason: str  # a sentence a person understands, as of the snapshot's `now`
    position: int  # 1-based queue position within its resource class, in admission order
    reservation: Reservation | None = None  # when `reason` is a reservation's


@dataclass(frozen=True, slots=True)
class Decisions:
    placements: tuple[Placement, ...]
    preemptions: tuple[Preemption, ...]
    waiting: tuple[Waiting, ...]  # every queued job not placed gets exactly one
