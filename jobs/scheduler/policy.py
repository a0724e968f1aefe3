"""The scheduling policy: one pass from a snapshot to placements, preemptions and waiting reasons.

Pure and deterministic: no I/O, no clock (the snapshot carries `now`), no Django.
docs/architecture.md ("Scheduling policy") states the rules; the choices it leaves open are made
here:

- Resource classes are scheduled one after another in name order. A tenant's in-pass charge and
  running-job count carry over from one class to the next, so a tenant that just got an h100
  goes later for an l4 too.
- Admission order within a class pops tenants from a heap keyed by (phase, share, tenant id).
  Phase 0: the tenant's next job fits under its guarantee; phase 1: it would borrow. Share is
  (usage + in-pass charge) / weight, where a placement charges gpus x price x CHARGE_HORIZON_S:
  the money the job would cost in its first hour, so one pass alternates between tenants the way
  their decayed spend would over the next hour. Within a tenant: priority desc, submit time, id.
- Reservations (EASY backfill, extended to a few): a job that cannot be placed for lack of slots
  reserves the machine where enough slots free up earliest (from running jobs' expected ends),
  at most one reservation per machine and MAX_RESERVATIONS_PER_CLASS per class. When no machine
  is left for it, a job takes over the reservation of a smaller one: small jobs fit in as slots
  free up, while a large one only starts if some machine is kept from refilling. A reserved
  machine still takes jobs that end before the shadow time, or that only use slots the
  reservation will not need.
- Preemption reclaims for a job that fits its tenant's guarantee; per machine, victims are taken
  in order (lowest priority, then newest) until enough is freed, then any victim not needed is
  spared again, highest priority first. The machine with the fewest victims, then fewest victim
  GPUs, then lowest top victim priority, then lowest id wins, and is reserved for that job.
- A job that names a runtime goes only on a machine that reported it working: placement,
  reservations and reclaiming all skip the others, and a class where no schedulable machine has
  it says so. Each runtime's machines are their own subset of the class, so what failed for one
  runtime in a pass says nothing about another.
- Waiting positions count only unplaced jobs: position 3 means two waiting jobs of that class
  are ahead in admission order. Tenants whose budget is reached come last.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import defaultdict
from collections.abc import Iterable

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

# How far ahead a placement is charged within the pass (seconds of its class's price).
CHARGE_HORIZON_S = 3600.0
# Reservations cost a scan over the class's running jobs each; a few protect the large jobs
# at the front of the queue without freezing the whole class.
MAX_RESERVATIONS_PER_CLASS = 8
# A class priced at zero still charges a token amount, so a pass alternates tenants there too.
UNPRICED_GPU_SECOND = 1e-9

NO_QUOTA = Quota(guaranteed=0, limit=0)


def tenant_name(tenant: Tenant) -> str:
    return tenant.label or f"tenant {tenant.id}"


def within_tenant_order(job: Queued) -> tuple[int, float, int]:
    return (-job.priority, job.submitted_at, job.job_id)


def no_quota_reason(resource_class: str) -> str:
    return f"no {resource_class} quota"


def too_large_reason(gpus: int, resource_class: str, largest: int) -> str:
    if largest == 0:
        return f"no schedulable {resource_class} machine"
    return f"no machine has {gpus} {resource_class} GPUs (largest has {largest})"


def no_runtime_reason(runtime: str, resource_class: str) -> str:
    return f"no {resource_class} worker has runtime {runtime}"


def too_large_for_runtime_reason(gpus: int, resource_class: str, runtime: str, largest: int) -> str:
    return (
        f"no {resource_class} worker with runtime {runtime} has {gpus} GPUs (largest has {largest})"
    )


def over_quota_reason(held: int, limit: int, resource_class: str) -> str:
    return f"over quota: {held}/{limit} {resource_class}"


def job_limit_reason(max_running_jobs: int) -> str:
    return f"at the limit of {max_running_jobs} running jobs"


BUDGET_REASON = "budget reached"


def capacity_reason(gpus: int, resource_class: str, runtime: str = "") -> str:
    with_runtime = f" with runtime {runtime}" if runtime else ""
    return f"waiting for {gpus} free {resource_class} on one machine{with_runtime}"


def _eta(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    if minutes < 120:
        return f"~{minutes} min"
    return f"~{round(minutes / 60)} h"


def reserved_reason(waiting_for: str, machine_id: int, seconds: float) -> str:
    """A reservation's reason, `seconds` before its machine is expected to fit the job: the pass
    words it as of its snapshot, and a page as of when it is read."""
    return f"{waiting_for} (reserved: machine {machine_id}, expected in {_eta(seconds)})"


def _group_queued(queued: Iterable[Queued]) -> dict[str, dict[int, list[Queued]]]:
    grouped: dict[str, dict[int, list[Queued]]] = defaultdict(lambda: defaultdict(list))
    for job in queued:
        grouped[job.resource_class][job.tenant_id].append(job)
    return grouped


class _Reservation:
    """Slots promised on one machine to one waiting job."""

    __slots__ = ("extra", "gpus", "holder", "runtime", "shadow")

    def __init__(
        self, shadow: float, extra: int, gpus: int, holder: int | None, runtime: str = ""
    ) -> None:
        self.shadow = shadow  # when the reserved job is expected to fit
        self.extra = extra  # slots free at the shadow time beyond what the job needs
        self.gpus = gpus  # what the job needs
        self.holder = holder  # its index among the class's waiting jobs; None: never bumped
        self.runtime = runtime  # the runtime the job needs, for its reason if it is bumped


class _Pool:
    """One class's schedulable machines: free slots, free-count buckets, reservations."""

    def __init__(self, machines: list[Machine], running: list[Running], now: float) -> None:
        self.now = now
        self.free: dict[int, list[int]] = {}
        self.slots: dict[int, int] = {}
        self.runtimes: dict[int, frozenset[str]] = {}
        for machine in sorted(machines, key=lambda m: m.id):
            if machine.schedulable:
                self.free[machine.id] = sorted(machine.free)
                self.slots[machine.id] = machine.slots
                self.runtimes[machine.id] = machine.runtimes
        self.largest = max(self.slots.values(), default=0)
        self._largest_with: dict[str, int] = {"": self.largest}
        # buckets[k]: ids (ascending) of machines with exactly k free slots, k >= 1.
        self.buckets: list[list[int]] = [[] for _ in range(self.largest + 1)]
        for machine_id, free in self.free.items():
            if free:
                self.buckets[len(free)].append(machine_id)
        self.max_free = max((len(f) for f in self.free.values()), default=0)
        self.reservations: dict[int, _Reservation] = {}
        self.capacity_reservations = 0
        # Reserving only gets harder within a pass, so a size that failed once fails again
        # (per runtime: each is its own subset of machines).
        self.unreservable: set[tuple[int, str]] = set()
        self._running = running
        self._releases: dict[int, list[tuple[float, int]]] | None = None
        self._placed: list[tuple[int, float, int]] = []

    def largest_with(self, runtime: str) -> int:
        """The most slots any machine with `runtime` has (0: none has it)."""
        largest = self._largest_with.get(runtime)
        if largest is None:
            largest = self._largest_with[runtime] = max(
                (self.slots[m] for m, names in self.runtimes.items() if runtime in names),
                default=0,
            )
        return largest

    def has_runtime(self, machine_id: int, runtime: str) -> bool:
        return not runtime or runtime in self.runtimes[machine_id]

    def find(self, gpus: int, end: float, runtime: str = "") -> tuple[int | None, bool]:
        """Best fit: the machine left with the fewest free slots, lowest id; and whether a
        reservation was all that stood in the way."""
        behind_reservation = False
        buckets, reservations = self.buckets, self.reservations
        for count in range(gpus, self.max_free + 1):
            for machine_id in buckets[count]:
                if runtime and runtime not in self.runtimes[machine_id]:
                    continue
                reservation = reservations.get(machine_id)
                if reservation is None or end <= reservation.shadow or gpus <= reservation.extra:
                    return machine_id, behind_reservation
                behind_reservation = True
        return None, behind_reservation

    def place(self, machine_id: int, gpus: int, end: float) -> tuple[int, ...]:
        free = self.free[machine_id]
        count = len(free)
        taken, self.free[machine_id] = tuple(free[:gpus]), free[gpus:]
        bucket = self.buckets[count]
        del bucket[bisect.bisect_left(bucket, machine_id)]
        if count > gpus:
            bisect.insort(self.buckets[count - gpus], machine_id)
        while self.max_free and not self.buckets[self.max_free]:
            self.max_free -= 1
        reservation = self.reservations.get(machine_id)
        if reservation is not None and end > reservation.shadow:
            reservation.extra -= gpus
        if self._releases is None:
            self._placed.append((machine_id, end, gpus))
        else:
            bisect.insort(self._releases[machine_id], (end, gpus))
        return taken

    def _release_times(self) -> dict[int, list[tuple[float, int]]]:
        if self._releases is None:
            releases: dict[int, list[tuple[float, int]]] = {m: [] for m in self.free}
            for job in self._running:
                if job.machine_id in releases:
                    # A job past its expected end is about to be stopped: it frees up now.
                    releases[job.machine_id].append((max(job.expected_end, self.now), job.gpus))
            for machine_id, end, gpus in self._placed:
                releases[machine_id].append((end, gpus))
            for ends in releases.values():
                ends.sort()
            self._releases = releases
        return self._releases

    def reserve(
        self, gpus: int, holder: int, runtime: str = ""
    ) -> tuple[int, float, _Reservation | None] | None:
        """Reserve the machine where `gpus` slots free up earliest: an unreserved one if any
        can ever fit the job, else one reserved for a smaller job, which loses it. Large jobs
        need reservations to ever find a machine empty enough; small ones fit in as slots
        free up. Returns the machine, the shadow time and the reservation taken over."""
        if (gpus, runtime) in self.unreservable:
            return None
        at_limit = self.capacity_reservations >= MAX_RESERVATIONS_PER_CLASS
        releases = self._release_times()
        best: tuple[bool, float, int, int] | None = None
        for machine_id in self.reservations if at_limit else releases:
            current = self.reservations.get(machine_id)
            bumps = current is not None
            if bumps and (current.holder is None or current.gpus >= gpus):
                continue
            if self.slots[machine_id] < gpus or not self.has_runtime(machine_id, runtime):
                continue
            free = len(self.free[machine_id])
            for end, released in releases[machine_id]:
                free += released
                if free >= gpus:
                    if best is None or (bumps, end, machine_id) < best[:3]:
                        best = (bumps, end, machine_id, free - gpus)
                    break
        if best is None:
            self.unreservable.add((gpus, runtime))
            return None
        bumps, shadow, machine_id, extra = best
        bumped = self.reservations.get(machine_id) if bumps else None
        self.reservations[machine_id] = _Reservation(shadow, extra, gpus, holder, runtime)
        if not bumps:
            self.capacity_reservations += 1
        return machine_id, shadow, bumped


class _Reclaimer:
    """Borrowers' running jobs in one class, as preemption victims per machine."""

    def __init__(self, pool: _Pool, running: list[Running], guaranteed: dict[int, int]) -> None:
        self.pool = pool
        self.guaranteed = guaranteed  # per tenant holding GPUs in the class
        # What each tenant held before this pass: a borrower is never preempted on the strength
        # of jobs placed in the same pass.
        self.held: dict[int, int] = defaultdict(int)
        for job in running:
            self.held[job.tenant_id] += job.gpus
        self.taken_gpus: dict[int, int] = defaultdict(int)  # tenant -> GPUs already reclaimed
        self.victims: dict[int, list[Running]] = defaultdict(list)
        self.victim_gpus: dict[int, int] = defaultdict(int)
        for job in running:
            tenant_id = job.tenant_id
            if job.machine_id in pool.free and self.held[tenant_id] > guaranteed[tenant_id]:
                self.victims[job.machine_id].append(job)
                self.victim_gpus[job.machine_id] += job.gpus
        for jobs in self.victims.values():
            jobs.sort(key=lambda j: (j.priority, -j.started_at, -j.job_id))
        self.machine_order = sorted(self.victims)
        # No set can beat one 1-GPU victim of the lowest priority there is: stop at the first.
        self.unbeatable = (1, 1, min((j.priority for j in running), default=0))
        # Reclaiming only gets harder within a pass, so a size that failed once fails again
        # (per runtime: each is its own subset of machines).
        self.smallest_failed: dict[str, float] = {}

    def _victims_on(self, machine_id: int, gpus: int) -> list[Running] | None:
        pool = self.pool
        have = len(pool.free[machine_id])
        if have + self.victim_gpus[machine_id] < gpus:
            return None
        held, guaranteed, taken = self.held, self.guaranteed, self.taken_gpus
        losing: dict[int, int] = {}
        chosen = []
        for job in self.victims[machine_id]:
            tenant_id = job.tenant_id
            after = held[tenant_id] - taken[tenant_id] - losing.get(tenant_id, 0) - job.gpus
            if after < guaranteed[tenant_id]:
                continue
            losing[tenant_id] = losing.get(tenant_id, 0) + job.gpus
            chosen.append(job)
            have += job.gpus
            if have >= gpus:
                break
        else:
            return None
        for job in reversed(chosen[:-1]):
            if have - job.gpus >= gpus:
                chosen.remove(job)
                have -= job.gpus
        return chosen

    def reclaim(self, gpus: int, runtime: str = "") -> tuple[int, list[Running]] | None:
        """The machine and the smallest set of victims that free `gpus` slots on it."""
        if gpus >= self.smallest_failed.get(runtime, math.inf):
            return None
        best_key, best = None, None
        pool = self.pool
        for machine_id in self.machine_order:
            if machine_id in pool.reservations or pool.slots[machine_id] < gpus:
                continue
            if not pool.has_runtime(machine_id, runtime):
                continue
            chosen = self._victims_on(machine_id, gpus)
            if chosen is None:
                continue
            key = (
                len(chosen),
                sum(j.gpus for j in chosen),
                max(j.priority for j in chosen),
                machine_id,
            )
            if best_key is None or key < best_key:
                best_key, best = key, (machine_id, chosen)
                if key[:3] == self.unbeatable:
                    break
        if best is None:
            self.smallest_failed[runtime] = gpus
            return None
        machine_id, chosen = best
        freed = 0
        remaining = self.victims[machine_id]
        for job in chosen:
            self.taken_gpus[job.tenant_id] += job.gpus
            remaining.remove(job)
            freed += job.gpus
        self.victim_gpus[machine_id] -= freed
        extra = len(pool.free[machine_id]) + freed - gpus
        # The freed slots are the job's next tick: nothing that outlives "now" may take them.
        pool.reservations[machine_id] = _Reservation(pool.now, extra, gpus, None, runtime)
        return machine_id, chosen


class _Pass:
    """State shared by the classes of one pass: per-tenant charge and running-job counts."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.now = snapshot.now
        self.charge: dict[int, float] = defaultdict(float)
        self.running_jobs: dict[int, int] = defaultdict(int)
        self.running_by_class: dict[str, list[Running]] = defaultdict(list)
        for job in snapshot.running:
            self.running_jobs[job.tenant_id] += 1
            self.running_by_class[job.resource_class].append(job)
        self.machines_by_class: dict[str, list[Machine]] = defaultdict(list)
        for machine in snapshot.machines:
            self.machines_by_class[machine.resource_class].append(machine)
        self.placements: list[Placement] = []
        self.preemptions: list[Preemption] = []
        self.waiting: list[Waiting] = []

    def tenant(self, tenant_id: int) -> Tenant:
        tenant = self.snapshot.tenants.get(tenant_id)
        return tenant if tenant is not None else Tenant(id=tenant_id, quotas={})

    def share(self, tenant: Tenant) -> float:
        return (tenant.usage + self.charge[tenant.id]) / (tenant.weight or 1e-9)


class _ClassPass:
    """Admission, placement and reasons for the queued jobs of one resource class."""

    def __init__(self, shared: _Pass, resource_class: str) -> None:
        self.shared = shared
        self.resource_class = resource_class
        self.now = shared.now
        self.running = shared.running_by_class[resource_class]
        self.pool = _Pool(shared.machines_by_class[resource_class], self.running, self.now)
        price = shared.snapshot.prices.get(resource_class, 0.0) or UNPRICED_GPU_SECOND
        self.charge_per_gpu = price * CHARGE_HORIZON_S
        self.held: dict[int, int] = defaultdict(int)  # GPUs per tenant, placements included
        for job in self.running:
            self.held[job.tenant_id] += job.gpus
        self.claimed: dict[int, int] = defaultdict(int)  # GPUs being reclaimed for a tenant
        self._reclaimer: _Reclaimer | None = None
        # Unplaced jobs in admission order, why each waits, and the machine held for it if any.
        self.unplaced: list[int] = []
        self.reasons: list[str] = []
        self.reservations: list[Reservation | None] = []
        self._capacity_reasons: dict[tuple[int, str], str] = {}

    def run(self, by_tenant: dict[int, list[Queued]]) -> None:
        shared = self.shared
        held, claimed, charge = self.held, self.claimed, shared.charge
        # The heap holds one entry per tenant, keyed by its next job: (phase, share, tenant id).
        # Phase 0 while that job fits under the tenant's guarantee, 1 when it would borrow.
        heap: list[tuple[int, float, int]] = []
        tenants: dict[int, Tenant] = {}
        quotas: dict[int, Quota] = {}
        over_budget: list[tuple[float, int]] = []
        for tenant_id, jobs in by_tenant.items():
            jobs.sort(key=within_tenant_order)
            tenant = tenants[tenant_id] = shared.tenant(tenant_id)
            quota = quotas[tenant_id] = tenant.quotas.get(self.resource_class, NO_QUOTA)
            if tenant.budget_ok:
                phase = 0 if held[tenant_id] + jobs[0].gpus <= quota.guaranteed else 1
                heap.append((phase, shared.share(tenant), tenant_id))
            else:
                over_budget.append((shared.share(tenant), tenant_id))
        heapq.heapify(heap)

        cursor = dict.fromkeys(by_tenant, 0)
        while heap:
            tenant_id = heap[0][2]
            jobs, index = by_tenant[tenant_id], cursor[tenant_id]
            cursor[tenant_id] = index + 1
            tenant, quota = tenants[tenant_id], quotas[tenant_id]
            self._admit(jobs[index], tenant, quota)
            if index + 1 < len(jobs):
                holding = held[tenant_id] + claimed[tenant_id]
                phase = 0 if holding + jobs[index + 1].gpus <= quota.guaranteed else 1
                # _Pass.share, inlined: this line runs once per queued job.
                share = (tenant.usage + charge[tenant_id]) / (tenant.weight or 1e-9)
                heapq.heapreplace(heap, (phase, share, tenant_id))
            else:
                heapq.heappop(heap)

        for _, tenant_id in sorted(over_budget):
            for job in by_tenant[tenant_id]:
                self.unplaced.append(job.job_id)
                self.reasons.append(tenants[tenant_id].block_reason or BUDGET_REASON)
                self.reservations.append(None)
        shared.waiting.extend(
            map(
                Waiting,
                self.unplaced,
                self.reasons,
                range(1, len(self.unplaced) + 1),
                self.reservations,
            )
        )

    def _admit(self, job: Queued, tenant: Tenant, quota: Quota) -> None:
        resource_class, pool = self.resource_class, self.pool
        tenant_id, gpus, runtime = tenant.id, job.gpus, job.runtime
        holding = self.held[tenant_id] + self.claimed[tenant_id]
        largest = pool.largest_with(runtime) if runtime else pool.largest
        reservation = None
        if quota.limit <= 0:
            reason = no_quota_reason(resource_class)
        elif runtime and largest == 0 and pool.largest > 0:
            reason = no_runtime_reason(runtime, resource_class)
        elif gpus > largest:
            if runtime and largest:
                reason = too_large_for_runtime_reason(gpus, resource_class, runtime, largest)
            else:
                reason = too_large_reason(gpus, resource_class, largest)
        elif holding + gpus > quota.limit:
            reason = over_quota_reason(holding, quota.limit, resource_class)
        elif (
            tenant.max_running_jobs is not None
            and self.shared.running_jobs[tenant_id] >= tenant.max_running_jobs
        ):
            reason = job_limit_reason(tenant.max_running_jobs)
        else:
            behind = False
            if gpus <= pool.max_free:  # the common case in a full class skips the search
                end = self.now + job.max_runtime_s
                machine_id, behind = pool.find(gpus, end, runtime)
                if machine_id is not None:
                    slots = pool.place(machine_id, gpus, end)
                    self.shared.placements.append(Placement(job.job_id, machine_id, slots))
                    self.held[tenant_id] += gpus
                    self.shared.running_jobs[tenant_id] += 1
                    self.shared.charge[tenant_id] += gpus * self.charge_per_gpu
                    return
            reason, reservation = self._wait_for_capacity(
                job, tenant, holding + gpus <= quota.guaranteed, behind
            )
        self.unplaced.append(job.job_id)
        self.reasons.append(reason)
        self.reservations.append(reservation)

    def _wait_for_capacity(
        self, job: Queued, tenant: Tenant, within_guarantee: bool, behind: bool
    ) -> tuple[str, Reservation | None]:
        """Reclaim borrowed slots or reserve a machine for a job that fits nowhere now."""
        gpus = job.gpus
        if within_guarantee:
            reclaimed = self._reclaimer_for_class().reclaim(gpus, job.runtime)
            if reclaimed is not None:
                self.claimed[tenant.id] += gpus
                return self._preempt(job, tenant, reclaimed[1]), None
        reserved = self.pool.reserve(gpus, holder=len(self.unplaced), runtime=job.runtime)
        if reserved is not None:
            machine_id, shadow, bumped = reserved
            if bumped is not None:
                self.reasons[bumped.holder] = self._capacity_reason(bumped.gpus, bumped.runtime)
                self.reservations[bumped.holder] = None
            waiting_for = self._capacity_reason(gpus, job.runtime)
            reason = reserved_reason(waiting_for, machine_id, shadow - self.now)
            return reason, Reservation(waiting_for, machine_id, shadow)
        if behind:
            return "waiting behind a reserved larger job", None
        return self._capacity_reason(gpus, job.runtime), None

    def _capacity_reason(self, gpus: int, runtime: str = "") -> str:
        reason = self._capacity_reasons.get((gpus, runtime))
        if reason is None:
            reason = self._capacity_reasons[gpus, runtime] = capacity_reason(
                gpus, self.resource_class, runtime
            )
        return reason

    def _reclaimer_for_class(self) -> _Reclaimer:
        if self._reclaimer is None:
            guaranteed = {
                other.tenant_id: self.shared.tenant(other.tenant_id)
                .quotas.get(self.resource_class, NO_QUOTA)
                .guaranteed
                for other in self.running
            }
            self._reclaimer = _Reclaimer(self.pool, self.running, guaranteed)
        return self._reclaimer

    def _preempt(self, job: Queued, tenant: Tenant, victims: list[Running]) -> str:
        resource_class = self.resource_class
        why = f"reclaimed for {tenant_name(tenant)}'s guaranteed {resource_class} share"
        self.shared.preemptions.extend(Preemption(v.job_id, job.job_id, why) for v in victims)
        count = len(victims)
        return (
            f"reclaiming {job.gpus} {resource_class} from borrowers "
            f"(preempting {count} job{'s' if count != 1 else ''})"
        )


def schedule(snapshot: Snapshot) -> Decisions:
    """One scheduling pass: what to start where, what to preempt, and why the rest waits."""
    state = _Pass(snapshot)
    grouped = _group_queued(snapshot.queued)
    for resource_class in sorted(grouped):
        _ClassPass(state, resource_class).run(grouped[resource_class])
    return Decisions(
        placements=tuple(state.placements),
        preemptions=tuple(state.preemptions),
        waiting=tuple(state.waiting),
    )
