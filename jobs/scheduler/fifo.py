"""The baseline the policy is measured against: strict FIFO per resource class.

Jobs go in submit order onto the first machine (lowest id) with enough free slots. Budget,
quota limits and running-job caps still hold, and a job that can never fit is passed over, but
the first job that finds no room blocks every later job of its class (head-of-line blocking):
no fair share, no backfill, no preemption. Same reasons and positions shape as `schedule`.
"""

from __future__ import annotations

from collections import defaultdict

from .policy import (
    BUDGET_REASON,
    NO_QUOTA,
    capacity_reason,
    job_limit_reason,
    no_quota_reason,
    no_runtime_reason,
    over_quota_reason,
    too_large_for_runtime_reason,
    too_large_reason,
)
from .types import Decisions, Placement, Queued, Snapshot, Tenant, Waiting

BEHIND_HEAD_REASON = "waiting behind an earlier job in the FIFO queue"


def fifo_schedule(snapshot: Snapshot) -> Decisions:
    """One FIFO pass over the snapshot."""
    held: dict[tuple[str, int], int] = defaultdict(int)
    running_jobs: dict[int, int] = defaultdict(int)
    for job in snapshot.running:
        held[job.resource_class, job.tenant_id] += job.gpus
        running_jobs[job.tenant_id] += 1
    free_by_class: dict[str, dict[int, list[int]]] = defaultdict(dict)
    runtimes: dict[int, frozenset[str]] = {}
    for machine in sorted(snapshot.machines, key=lambda m: m.id):
        if machine.schedulable:
            free_by_class[machine.resource_class][machine.id] = sorted(machine.free)
            runtimes[machine.id] = machine.runtimes
    # The largest machine per (class, runtime); runtime "" stands for any machine of the class.
    slots_by_class: dict[tuple[str, str], int] = defaultdict(int)
    for machine in snapshot.machines:
        if machine.schedulable:
            for name in ("", *machine.runtimes):
                key = (machine.resource_class, name)
                slots_by_class[key] = max(slots_by_class[key], machine.slots)
    queued_by_class: dict[str, list[Queued]] = defaultdict(list)
    for job in snapshot.queued:
        queued_by_class[job.resource_class].append(job)

    placements: list[Placement] = []
    waiting: list[Waiting] = []
    for resource_class in sorted(queued_by_class):
        free = free_by_class[resource_class]
        any_largest = slots_by_class[resource_class, ""]
        blocked = False
        position = 0
        for job in sorted(
            queued_by_class[resource_class], key=lambda j: (j.submitted_at, j.job_id)
        ):
            tenant = snapshot.tenants.get(job.tenant_id) or Tenant(id=job.tenant_id, quotas={})
            quota = tenant.quotas.get(resource_class, NO_QUOTA)
            holding = held[resource_class, job.tenant_id]
            runtime = job.runtime
            largest = slots_by_class[resource_class, runtime]
            reason = None
            if not tenant.budget_ok:
                reason = tenant.block_reason or BUDGET_REASON
            elif quota.limit <= 0:
                reason = no_quota_reason(resource_class)
            elif runtime and largest == 0 and any_largest > 0:
                reason = no_runtime_reason(runtime, resource_class)
            elif job.gpus > largest:
                if runtime and largest:
                    reason = too_large_for_runtime_reason(
                        job.gpus, resource_class, runtime, largest
                    )
                else:
                    reason = too_large_reason(job.gpus, resource_class, largest)
            elif holding + job.gpus > quota.limit:
                reason = over_quota_reason(holding, quota.limit, resource_class)
            elif (
                tenant.max_running_jobs is not None
                and running_jobs[job.tenant_id] >= tenant.max_running_jobs
            ):
                reason = job_limit_reason(tenant.max_running_jobs)
            elif blocked:
                reason = BEHIND_HEAD_REASON
            else:
                machine_id = next(
                    (
                        m
                        for m, f in free.items()
                        if len(f) >= job.gpus and (not runtime or runtime in runtimes[m])
                    ),
                    None,
                )
                if machine_id is None:
                    blocked = True
                    reason = capacity_reason(job.gpus, resource_class, runtime)
                else:
                    slots = free[machine_id]
                    free[machine_id] = slots[job.gpus :]
                    placements.append(Placement(job.job_id, machine_id, tuple(slots[: job.gpus])))
                    held[resource_class, job.tenant_id] += job.gpus
                    running_jobs[job.tenant_id] += 1
            if reason is not None:
                position += 1
                waiting.append(Waiting(job.job_id, reason, position))
    return Decisions(placements=tuple(placements), preemptions=(), waiting=tuple(waiting))
