"""The scheduling policy as a pure function: hand-made snapshots in, decisions out."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from jobs.scheduler import (
    Decisions,
    Machine,
    Queued,
    Quota,
    Running,
    Snapshot,
    Tenant,
    fifo_schedule,
    schedule,
)

NOW = 1_000_000.0
HOUR = 3600.0
NO_ACCESS = Quota(0, 0)
A100 = "a100-40gb"
H100 = "h100-80gb"
L4 = "l4-24gb"


TORCH = "torch-2.13-py311"


def machine(machine_id, free=8, slots=8, cls=A100, schedulable=True, runtimes=()):
    indices = range(slots - free, slots) if isinstance(free, int) else free
    return Machine(machine_id, cls, slots, frozenset(indices), schedulable, frozenset(runtimes))


def queued(job_id, tenant=1, gpus=1, cls=A100, priority=0, submitted=None, runtime=HOUR, env=""):
    submitted = NOW - 1000 + job_id if submitted is None else submitted
    return Queued(job_id, tenant, cls, gpus, priority, submitted, runtime, env)


def running(job_id, tenant, machine_id, gpus=1, cls=A100, priority=0, started=None, ends_in=HOUR):
    started = NOW - 600 if started is None else started
    return Running(job_id, tenant, cls, gpus, machine_id, priority, started, NOW + ends_in)


def tenant(tenant_id, guaranteed=0, limit=64, classes=(A100,), **kwargs):
    quotas = {cls: Quota(guaranteed, limit) for cls in classes}
    return Tenant(tenant_id, quotas, **kwargs)


def snap(machines, jobs=(), busy=(), tenants=None, prices=None, now=NOW):
    if tenants is None:
        ids = {j.tenant_id for j in jobs} | {r.tenant_id for r in busy}
        tenants = [tenant(i) for i in sorted(ids)]
    return Snapshot(
        now=now,
        machines=tuple(machines),
        running=tuple(busy),
        queued=tuple(jobs),
        tenants={t.id: t for t in tenants},
        prices=prices or {A100: 2 / HOUR, H100: 4 / HOUR, L4: 0.7 / HOUR},
    )


def placed(decisions: Decisions) -> dict[int, tuple[int, tuple[int, ...]]]:
    return {p.job_id: (p.machine_id, p.slots) for p in decisions.placements}


def reasons(decisions: Decisions) -> dict[int, str]:
    return {w.job_id: w.reason for w in decisions.waiting}


# Placement


def test_gang_job_never_splits_across_machines():
    machines = [machine(1, free=4), machine(2, free=4)]
    busy = [running(90, 2, 1, gpus=4), running(91, 2, 2, gpus=4)]
    decisions = schedule(snap(machines, [queued(1, gpus=8)], busy))
    assert decisions.placements == ()
    assert reasons(decisions)[1].startswith("waiting for 8 free a100-40gb on one machine")


def test_job_larger_than_any_machine_waits_with_reason():
    decisions = schedule(snap([machine(1), machine(2)], [queued(1, gpus=16)]))
    assert reasons(decisions) == {1: "no machine has 16 a100-40gb GPUs (largest has 8)"}


def test_best_fit_picks_machine_left_with_fewest_free_slots():
    machines = [machine(1, free=8), machine(2, free=5), machine(3, free=3), machine(4, free=1)]
    decisions = schedule(snap(machines, [queued(1, gpus=2)]))
    assert placed(decisions) == {1: (3, (5, 6))}


def test_best_fit_ties_go_to_lowest_machine_id_and_lowest_slots():
    machines = [machine(3, free={1, 4, 6}), machine(2, free={7, 0, 5})]
    decisions = schedule(snap(machines, [queued(1, gpus=2)]))
    assert placed(decisions) == {1: (2, (0, 5))}


def test_resource_classes_are_independent():
    machines = [machine(1, cls=H100), machine(2, free=0, cls=A100)]
    tenants = [tenant(1, classes=(A100, H100))]
    decisions = schedule(snap(machines, [queued(1, cls=A100)], tenants=tenants))
    assert decisions.placements == ()
    assert reasons(decisions)[1].startswith("waiting for 1 free a100-40gb")


def test_cordoned_machine_gets_nothing():
    machines = [machine(1, schedulable=False), machine(2, free=2)]
    decisions = schedule(snap(machines, [queued(1, gpus=2), queued(2, gpus=4)]))
    assert placed(decisions) == {1: (2, (6, 7))}
    assert reasons(decisions) == {2: "waiting for 4 free a100-40gb on one machine"}


def test_class_with_only_cordoned_machines_says_so():
    decisions = schedule(snap([machine(1, schedulable=False)], [queued(1)]))
    assert reasons(decisions) == {1: "no schedulable a100-40gb machine"}


# Admission order


def test_priority_orders_jobs_within_a_tenant():
    jobs = [
        queued(1, priority=0, submitted=NOW - 500),
        queued(2, priority=5, submitted=NOW - 10),
        queued(3, priority=5, submitted=NOW - 20),
    ]
    decisions = schedule(snap([machine(1, free=2)], jobs))
    assert set(placed(decisions)) == {2, 3}
    assert [(w.job_id, w.position) for w in decisions.waiting] == [(1, 1)]


def test_guaranteed_tenant_goes_before_borrowers_whatever_its_spend():
    tenants = [tenant(1, guaranteed=0, usage=0.0), tenant(2, guaranteed=4, usage=1e6)]
    jobs = [queued(1, tenant=1, gpus=4), queued(2, tenant=2, gpus=4)]
    decisions = schedule(snap([machine(1, free=4)], jobs, tenants=tenants))
    assert set(placed(decisions)) == {2}


def test_fair_share_prefers_tenant_with_less_recent_spend():
    tenants = [tenant(1, usage=50.0), tenant(2, usage=10.0)]
    jobs = [queued(1, tenant=1, submitted=NOW - 999), queued(2, tenant=2, submitted=NOW)]
    decisions = schedule(snap([machine(1, free=1)], jobs, tenants=tenants))
    assert set(placed(decisions)) == {2}


def test_fair_share_divides_spend_by_weight():
    tenants = [tenant(1, usage=50.0, weight=10.0), tenant(2, usage=10.0)]
    jobs = [queued(1, tenant=1), queued(2, tenant=2)]
    decisions = schedule(snap([machine(1, free=1)], jobs, tenants=tenants))
    assert set(placed(decisions)) == {1}


def test_one_pass_alternates_between_equal_tenants():
    jobs = [queued(i, tenant=1) for i in range(1, 5)] + [queued(i, tenant=2) for i in range(5, 9)]
    decisions = schedule(snap([machine(1, free=4)], jobs))
    holders = Counter(job_id < 5 for job_id in placed(decisions))
    assert holders == {True: 2, False: 2}


def test_spend_is_compared_in_money_across_classes():
    # Tenant 1 takes one pricey a100 GPU; tenant 2 takes two cheap l4 GPUs. For the one h100
    # slot left, tenant 2 has spent less money despite holding more GPUs, so it goes first,
    # though a tie would have gone to tenant 1.
    classes = (A100, H100, L4)
    prices = {A100: 8 / HOUR, L4: 1 / HOUR, H100: 4 / HOUR}
    machines = [machine(1, cls=A100), machine(2, cls=L4), machine(3, free=1, cls=H100)]
    jobs = [
        queued(1, tenant=1, cls=A100),
        queued(2, tenant=2, gpus=2, cls=L4),
        queued(3, tenant=1, cls=H100),
        queued(4, tenant=2, cls=H100),
    ]
    tenants = [tenant(1, classes=classes), tenant(2, classes=classes)]
    decisions = schedule(snap(machines, jobs, tenants=tenants, prices=prices))
    assert set(placed(decisions)) == {1, 2, 4}


def test_positions_follow_admission_order_within_each_class():
    tenants = [tenant(1, usage=30.0, classes=(A100, L4)), tenant(2, usage=10.0)]
    jobs = [
        queued(1, tenant=1, submitted=NOW - 900),
        queued(2, tenant=2, submitted=NOW - 100),
        queued(3, tenant=1, cls=L4),
    ]
    machines = [machine(1, free=0), machine(2, free=0, cls=L4)]
    busy = [running(90, 3, 1, gpus=8), running(91, 3, 2, gpus=8, cls=L4)]
    decisions = schedule(snap(machines, jobs, busy, tenants=[*tenants, tenant(3)]))
    assert {w.job_id: w.position for w in decisions.waiting} == {2: 1, 1: 2, 3: 1}


# Limits


def test_quota_limit_stops_borrowing():
    tenants = [tenant(1, guaranteed=2, limit=8)]
    busy = [running(90, 1, 1, gpus=8)]
    decisions = schedule(snap([machine(1, free=0), machine(2)], [queued(1)], busy, tenants))
    assert reasons(decisions) == {1: "over quota: 8/8 a100-40gb"}


def test_quota_limit_counts_gpus_placed_in_the_same_pass():
    tenants = [tenant(1, limit=6)]
    jobs = [queued(1, gpus=4), queued(2, gpus=4), queued(3, gpus=2)]
    decisions = schedule(snap([machine(1), machine(2)], jobs, tenants=tenants))
    assert set(placed(decisions)) == {1, 3}
    assert reasons(decisions) == {2: "over quota: 4/6 a100-40gb"}


def test_tenant_without_quota_in_class_gets_nothing():
    tenants = [tenant(1, classes=(L4,))]
    decisions = schedule(snap([machine(1)], [queued(1)], tenants=tenants))
    assert reasons(decisions) == {1: "no a100-40gb quota"}


def test_unknown_tenant_gets_no_placement():
    decisions = schedule(snap([machine(1)], [queued(1, tenant=7)], tenants=[]))
    assert reasons(decisions) == {1: "no a100-40gb quota"}


def test_max_running_jobs_caps_placements():
    tenants = [tenant(1, max_running_jobs=2, classes=(A100, L4))]
    busy = [running(90, 1, 2, cls=L4)]
    jobs = [queued(1), queued(2), queued(3)]
    machines = [machine(1), machine(2, free=7, cls=L4)]
    decisions = schedule(snap(machines, jobs, busy, tenants=tenants))
    assert set(placed(decisions)) == {1}
    assert reasons(decisions) == {
        2: "at the limit of 2 running jobs",
        3: "at the limit of 2 running jobs",
    }


def test_budget_reached_tenant_gets_no_placement():
    tenants = [tenant(1, budget_ok=False), tenant(2, usage=1e9)]
    jobs = [queued(1, tenant=1), queued(2, tenant=1), queued(3, tenant=2)]
    decisions = schedule(snap([machine(1)], jobs, tenants=tenants))
    assert set(placed(decisions)) == {3}
    assert [(w.job_id, w.reason, w.position) for w in decisions.waiting] == [
        (1, "budget reached", 1),
        (2, "budget reached", 2),
    ]


# Reservations and backfill


def staggered_machine(machine_id=1, tenant_id=9, every=5 * 60):
    """A full 8-slot machine whose 1-GPU jobs end one by one, every `every` seconds."""
    busy = [
        running(100 * machine_id + slot, tenant_id, machine_id, ends_in=every * (slot + 1))
        for slot in range(8)
    ]
    return machine(machine_id, free=0), busy


def test_blocked_job_reserves_machine_that_frees_up_first_and_says_when():
    machines = [machine(11, free=2, cls=H100), machine(12, free=4, cls=H100)]
    busy = [
        running(110, 9, 11, gpus=6, cls=H100, ends_in=2 * HOUR),
        running(120, 9, 12, gpus=2, cls=H100, ends_in=35 * 60 - 30),
        running(121, 9, 12, gpus=2, cls=H100, ends_in=50 * 60),
    ]
    tenants = [tenant(1, classes=(H100,)), tenant(9, classes=(H100,))]
    decisions = schedule(snap(machines, [queued(1, gpus=6, cls=H100)], busy, tenants))
    assert reasons(decisions) == {
        1: "waiting for 6 free h100-80gb on one machine (reserved: machine 12, expected in ~35 min)"
    }


def test_backfill_takes_reserved_machine_only_for_jobs_ending_before_shadow_time():
    box, busy = staggered_machine(every=5 * 60)  # all eight free after 40 minutes
    busy = busy[1:]  # slot 0 is free now
    box = machine(1, free={0})
    jobs = [
        queued(1, gpus=8, submitted=NOW - 300),
        queued(3, runtime=2 * HOUR, submitted=NOW - 200),  # would delay it
        queued(2, runtime=30 * 60, submitted=NOW - 100),  # done before it can start: backfills
    ]
    decisions = schedule(snap([box], jobs, busy))
    assert placed(decisions) == {2: (1, (0,))}
    assert reasons(decisions)[3] == "waiting behind a reserved larger job"
    assert reasons(decisions)[1].startswith("waiting for 8 free a100-40gb on one machine (reserved")


def test_backfill_may_use_slots_the_reservation_does_not_need():
    # Four free now, four more in 30 minutes; the 6-GPU job needs six of those eight.
    box = machine(1, free=4)
    busy = [running(90, 9, 1, gpus=4, ends_in=30 * 60)]
    jobs = [queued(1, gpus=6), queued(2, gpus=2, runtime=5 * HOUR), queued(3, runtime=5 * HOUR)]
    decisions = schedule(snap([box], jobs, busy))
    assert set(placed(decisions)) == {2}
    assert reasons(decisions)[3] == "waiting behind a reserved larger job"


def test_small_jobs_elsewhere_are_not_held_back_by_a_reservation():
    box, busy = staggered_machine(1)
    jobs = [queued(1, gpus=8), queued(2, runtime=10 * HOUR)]
    decisions = schedule(snap([box, machine(2, free=1)], jobs, busy))
    assert placed(decisions) == {2: (2, (7,))}


def test_large_job_is_not_starved_by_small_jobs():
    """Ticks every 5 minutes; another tenant submits two hour-long 1-GPU jobs per tick, yet the
    8-GPU job starts as soon as the machine's last running job ends, because no small job may
    outlast its reservation."""
    _, initial = staggered_machine(every=5 * 60)
    busy = {job.job_id: (job, (slot,)) for slot, job in enumerate(initial)}
    jobs = {1: queued(1, tenant=1, gpus=8, submitted=NOW - 60)}
    started = {}
    for tick in range(12):
        now = NOW + tick * 5 * 60
        for job_id in [i for i, (job, _) in busy.items() if job.expected_end <= now]:
            del busy[job_id]
        for k in range(2):
            job_id = 1000 + tick * 2 + k
            jobs[job_id] = queued(job_id, tenant=2, submitted=now, runtime=HOUR)
        taken = {slot for _, slots in busy.values() for slot in slots}
        box = machine(1, free=set(range(8)) - taken)
        running_now = [job for job, _ in busy.values()]
        decisions = schedule(snap([box], jobs.values(), running_now, now=now))
        for placement in decisions.placements:
            job = jobs.pop(placement.job_id)
            end = now + job.max_runtime_s
            run = Running(job.job_id, job.tenant_id, A100, job.gpus, 1, 0, now, end)
            busy[job.job_id] = (run, placement.slots)
            started[job.job_id] = now
    assert started[1] == NOW + 40 * 60


def test_large_job_takes_over_a_smaller_jobs_reservation_when_none_is_left():
    """Two cheaper small jobs come first and reserve both machines; the large job takes one of
    their reservations over, since small jobs fit in as slots free up and it cannot."""
    busy = [*staggered_machine(1)[1], *staggered_machine(2)[1]]
    jobs = [
        queued(1, tenant=1, gpus=8, submitted=NOW - 60),
        queued(2, tenant=2, submitted=NOW),
        queued(3, tenant=2, submitted=NOW),
    ]
    tenants = [tenant(1, usage=100.0), tenant(2, usage=0.0), tenant(9)]
    decisions = schedule(snap([machine(1, free=0), machine(2, free=0)], jobs, busy, tenants))
    assert [(w.job_id, w.position) for w in decisions.waiting] == [(2, 1), (3, 2), (1, 3)]
    assert reasons(decisions) == {
        2: "waiting for 1 free a100-40gb on one machine",
        3: "waiting for 1 free a100-40gb on one machine (reserved: machine 2, expected in ~5 min)",
        1: "waiting for 8 free a100-40gb on one machine (reserved: machine 1, expected in ~40 min)",
    }


def test_long_waits_are_given_in_hours():
    busy = [running(90, 9, 1, gpus=8, ends_in=5 * HOUR)]
    decisions = schedule(snap([machine(1, free=0)], [queued(1, gpus=8)], busy))
    assert reasons(decisions)[1].endswith("(reserved: machine 1, expected in ~5 h)")


def test_slot_freed_on_a_reserved_machine_stays_free_for_the_large_job():
    """An hour-long 1-GPU job would delay the reserved 8-GPU job, so it does not get the slot."""
    _, busy = staggered_machine(every=5 * 60)
    busy = busy[1:]  # slot 0 just freed
    jobs = [queued(1, gpus=8, submitted=NOW - 60), queued(2, tenant=2, submitted=NOW)]
    decisions = schedule(snap([machine(1, free={0})], jobs, busy))
    assert decisions.placements == ()
    assert reasons(decisions)[2] == "waiting behind a reserved larger job"


# Preemption


def test_borrowed_slots_are_reclaimed_for_guaranteed_tenant():
    tenants = [tenant(1, guaranteed=4, label="acme"), tenant(2, guaranteed=0)]
    busy = [running(90, 2, 1, gpus=4), running(91, 2, 1, gpus=4)]
    decisions = schedule(snap([machine(1, free=0)], [queued(1, gpus=4)], busy, tenants))
    # Equal priority and start: the higher job id counts as the newer one.
    assert [(p.job_id, p.for_job_id, p.reason) for p in decisions.preemptions] == [
        (91, 1, "reclaimed for acme's guaranteed a100-40gb share")
    ]
    assert reasons(decisions) == {1: "reclaiming 4 a100-40gb from borrowers (preempting 1 job)"}


def test_reclaimed_slots_go_to_the_guaranteed_job_on_the_next_tick():
    tenants = [tenant(1, guaranteed=4, usage=1e6), tenant(2), tenant(3)]
    busy = [running(90, 2, 1, gpus=4, started=NOW - 50), running(91, 2, 1, gpus=4)]
    jobs = [queued(1, tenant=1, gpus=4), queued(2, tenant=3, gpus=4, submitted=NOW - 5000)]
    decisions = schedule(snap([machine(1, free=0)], jobs, busy, tenants))
    assert [p.job_id for p in decisions.preemptions] == [90]
    # Next tick the victim has checkpointed and released its slots.
    later = schedule(snap([machine(1, free={0, 1, 2, 3})], jobs, busy[1:], tenants, now=NOW + 30))
    assert set(placed(later)) == {1}


def test_free_slots_on_a_reclaimed_machine_are_held_for_the_reclaiming_job():
    tenants = [tenant(1, guaranteed=4), tenant(2), tenant(3)]
    busy = [running(90, 2, 1, gpus=2), running(91, 2, 1, gpus=4, started=NOW - 5000)]
    jobs = [queued(1, tenant=1, gpus=4), queued(2, tenant=3, gpus=2, runtime=10 * HOUR)]
    decisions = schedule(snap([machine(1, free={6, 7})], jobs, busy, tenants))
    assert [p.job_id for p in decisions.preemptions] == [90]
    assert decisions.placements == ()
    assert reasons(decisions)[2] == "waiting behind a reserved larger job"


def test_preemption_victims_are_lowest_priority_then_newest():
    tenants = [tenant(1, guaranteed=2), tenant(2)]
    busy = [
        running(90, 2, 1, priority=3, started=NOW - 10),
        running(91, 2, 1, priority=0, started=NOW - 500),
        running(92, 2, 1, priority=1, started=NOW - 10),
        running(93, 2, 1, priority=0, started=NOW - 100),
        running(94, 2, 1, priority=0, started=NOW - 900),
        running(95, 2, 1, priority=2, started=NOW - 10),
        running(96, 2, 1, priority=2, started=NOW - 10),
        running(97, 2, 1, priority=2, started=NOW - 10),
    ]
    decisions = schedule(snap([machine(1, free=0)], [queued(1, gpus=2)], busy, tenants))
    assert sorted(p.job_id for p in decisions.preemptions) == [91, 93]


def test_preemption_takes_the_smallest_set_of_victims():
    tenants = [tenant(1, guaranteed=4), tenant(2)]
    machines = [machine(1, free=0), machine(2, free=0), machine(3, free=2)]
    busy = [
        *(running(100 + s, 2, 1) for s in range(8)),  # four 1-GPU victims needed here
        running(200, 2, 2, gpus=4),  # one 4-GPU victim here
        running(201, 2, 2, gpus=4),
        running(300, 2, 3, gpus=2, started=NOW - 10),  # one newest 2-GPU victim beside two
        running(301, 2, 3, gpus=4),  # free slots: as few jobs as machine 2, fewer GPUs
    ]
    decisions = schedule(snap(machines, [queued(1, gpus=4)], busy, tenants))
    assert [p.job_id for p in decisions.preemptions] == [300]


def test_preemption_spares_victims_it_does_not_need():
    # Lowest priority first takes the 1-GPU job, then needs the 4-GPU one; the 1-GPU job is
    # then not needed and is spared.
    tenants = [tenant(1, guaranteed=4), tenant(2)]
    busy = [
        running(90, 2, 1, gpus=1, priority=0),
        running(91, 2, 1, gpus=4, priority=1),
        running(92, 2, 1, gpus=3, priority=2),
    ]
    decisions = schedule(snap([machine(1, free=0)], [queued(1, gpus=4)], busy, tenants))
    assert [p.job_id for p in decisions.preemptions] == [91]
    assert reasons(decisions)[1] == "reclaiming 4 a100-40gb from borrowers (preempting 1 job)"


def test_no_preemption_when_borrower_would_fall_below_its_guarantee():
    tenants = [tenant(1, guaranteed=2), tenant(2, guaranteed=6)]
    busy = [running(90, 2, 1, gpus=4), running(91, 2, 1, gpus=4)]
    decisions = schedule(snap([machine(1, free=0)], [queued(1, gpus=2)], busy, tenants))
    assert decisions.preemptions == ()
    assert reasons(decisions)[1].startswith("waiting for 2 free a100-40gb on one machine")


def test_borrowing_job_never_preempts():
    tenants = [tenant(1, guaranteed=2), tenant(2)]
    busy = [running(90, 2, 1, gpus=4), running(91, 2, 1, gpus=4)]
    decisions = schedule(snap([machine(1, free=0)], [queued(1, gpus=4)], busy, tenants))
    assert decisions.preemptions == ()


def test_one_pass_reclaims_for_several_guaranteed_jobs_without_double_counting():
    tenants = [tenant(1, guaranteed=4), tenant(2, guaranteed=2)]
    busy = [running(90 + i, 2, 1 + i // 4, gpus=2, started=NOW - i) for i in range(8)]
    jobs = [queued(1, gpus=2), queued(2, gpus=2), queued(3, gpus=2)]
    decisions = schedule(snap([machine(1, free=0), machine(2, free=0)], jobs, busy, tenants))
    victims = [p.job_id for p in decisions.preemptions]
    assert len(victims) == len(set(victims)) == 2  # the third job would exceed the guarantee
    assert reasons(decisions)[3].startswith("waiting for 2 free")


# Reasons and positions


# Runtimes


@pytest.mark.parametrize("policy", [schedule, fifo_schedule], ids=["policy", "fifo"])
def test_job_with_a_runtime_goes_to_the_machine_that_has_it(policy):
    # Best fit alone would pick machine 1 (fewer free slots); only machine 2 has the runtime.
    machines = [machine(1, free=2), machine(2, free=8, runtimes=[TORCH, "other-1"])]
    decisions = policy(snap(machines, [queued(1, env=TORCH), queued(2)]))
    assert placed(decisions)[1][0] == 2
    assert placed(decisions)[2][0] == 1


@pytest.mark.parametrize("policy", [schedule, fifo_schedule], ids=["policy", "fifo"])
def test_job_whose_runtime_no_machine_has_waits_and_says_which(policy):
    machines = [machine(1, runtimes=["other-1"]), machine(2, cls=H100, runtimes=[TORCH])]
    decisions = policy(snap(machines, [queued(1, env=TORCH), queued(2)]))
    assert 1 not in placed(decisions)
    assert reasons(decisions)[1] == f"no {A100} worker has runtime {TORCH}"
    assert placed(decisions)[2][0] == 1


def test_a_cordoned_machine_with_the_runtime_does_not_count():
    machines = [machine(1), machine(2, schedulable=False, runtimes=[TORCH])]
    decisions = schedule(snap(machines, [queued(1, env=TORCH)]))
    assert reasons(decisions) == {1: f"no {A100} worker has runtime {TORCH}"}


def test_job_with_a_runtime_waits_for_a_busy_machine_that_has_it():
    machines = [machine(1), machine(2, free=0, runtimes=[TORCH])]
    busy = [running(10, 2, 2, gpus=8, ends_in=HOUR / 2)]
    decisions = schedule(snap(machines, [queued(1, env=TORCH)], busy))
    assert placed(decisions) == {}
    assert reasons(decisions)[1] == (
        f"waiting for 1 free {A100} on one machine with runtime {TORCH} "
        "(reserved: machine 2, expected in ~30 min)"
    )


def test_job_with_a_runtime_reclaims_only_on_a_machine_that_has_it():
    # Tenant 2 borrows both machines; tenant 1's guaranteed job needs the runtime on machine 2.
    machines = [machine(1, free=0, slots=1), machine(2, free=0, slots=1, runtimes=[TORCH])]
    busy = [running(10, 2, 1, priority=0), running(11, 2, 2, priority=3)]
    tenants = [tenant(1, guaranteed=1, limit=2), tenant(2, guaranteed=0, limit=2)]
    decisions = schedule(snap(machines, [queued(1, env=TORCH)], busy, tenants))
    assert [(p.job_id, p.for_job_id) for p in decisions.preemptions] == [(11, 1)]


def test_every_unplaced_job_gets_a_reason_and_position():
    tenants = [
        tenant(1, limit=2, classes=(A100, L4)),
        tenant(2, budget_ok=False),
        tenant(3, max_running_jobs=0),
        tenant(4, classes=(L4,)),
    ]
    jobs = [
        queued(1, tenant=1, gpus=2),
        queued(2, tenant=1, gpus=2),
        queued(3, tenant=2),
        queued(4, tenant=3),
        queued(5, tenant=4),
        queued(6, tenant=1, gpus=16),
        queued(7, tenant=1, cls=L4),
        queued(8, tenant=4, cls=L4),
    ]
    decisions = schedule(snap([machine(1, free=2)], jobs, tenants=tenants))
    assert set(placed(decisions)) == {1}
    assert len(decisions.waiting) == 7
    assert all(w.reason for w in decisions.waiting)
    by_class = defaultdict(list)
    for w in decisions.waiting:
        by_class[next(j.resource_class for j in jobs if j.job_id == w.job_id)].append(w.position)
    assert {cls: sorted(p) for cls, p in by_class.items()} == {A100: [1, 2, 3, 4, 5], L4: [1, 2]}
    assert reasons(decisions)[3] == "budget reached"
    assert reasons(decisions)[4] == "at the limit of 0 running jobs"
    assert reasons(decisions)[5] == "no a100-40gb quota"


# The FIFO baseline


def test_fifo_baseline_blocks_the_head_of_the_line():
    machines = [machine(1, free=2), machine(2, free=1)]
    jobs = [queued(1, gpus=1), queued(2, gpus=4), queued(3, gpus=1)]
    decisions = fifo_schedule(snap(machines, jobs))
    assert placed(decisions) == {1: (1, (6,))}
    assert [(w.job_id, w.reason, w.position) for w in decisions.waiting] == [
        (2, "waiting for 4 free a100-40gb on one machine", 1),
        (3, "waiting behind an earlier job in the FIFO queue", 2),
    ]
    assert set(placed(schedule(snap(machines, jobs)))) == {1, 3}


def test_fifo_baseline_respects_quota_and_ignores_fair_share():
    tenants = [tenant(1, limit=1, usage=1e9), tenant(2, usage=0.0)]
    jobs = [queued(1, tenant=1), queued(2, tenant=1), queued(3, tenant=2)]
    decisions = fifo_schedule(snap([machine(1, free=2)], jobs, tenants=tenants))
    assert set(placed(decisions)) == {1, 3}
    assert reasons(decisions) == {2: "over quota: 1/1 a100-40gb"}


# Invariants over random snapshots


RUNTIMES = ("torch-2.13-py311", "jax-0.6-py312")


def random_snapshot(rng: random.Random, runtimes: bool = False) -> Snapshot:
    """A random pool; with `runtimes`, machines report some of RUNTIMES and jobs may need one
    (drawn from a second generator, so the snapshots without them stay as they were)."""
    extra = random.Random(rng.random()) if runtimes else None  # noqa: S311 (seeded test data)
    classes = [A100, H100, L4][: rng.randint(1, 3)]
    machines, busy = [], []
    job_id = 1
    for machine_id in range(1, rng.randint(1, 12)):
        cls = rng.choice(classes)
        slots = rng.choice((1, 2, 4, 8))
        free = set(range(slots))
        while free and rng.random() < 0.7:
            gpus = rng.randint(1, len(free))
            taken = rng.sample(sorted(free), gpus)
            free.difference_update(taken)
            started = NOW - rng.uniform(0, 5 * HOUR)
            busy.append(
                Running(
                    job_id,
                    rng.randint(1, 6),
                    cls,
                    gpus,
                    machine_id,
                    rng.randint(0, 3),
                    started,
                    started + rng.uniform(0.1, 10) * HOUR,
                )
            )
            job_id += 1
        has = frozenset(r for r in RUNTIMES if runtimes and extra.random() < 0.4)
        machines.append(Machine(machine_id, cls, slots, frozenset(free), rng.random() > 0.15, has))
    jobs = [
        Queued(
            job_id + i,
            rng.randint(1, 6),
            rng.choice(classes),
            rng.choice((1, 1, 1, 2, 4, 8, 16)),
            rng.randint(0, 3),
            NOW - rng.uniform(0, HOUR),
            rng.uniform(0.1, 5) * HOUR,
            extra.choice(("", "", *RUNTIMES)) if runtimes else "",
        )
        for i in range(rng.randint(0, 40))
    ]
    tenants = {}
    for tenant_id in range(1, 7):
        quotas = {}
        for cls in classes:
            if rng.random() < 0.9:
                guaranteed = rng.randint(0, 8)
                quotas[cls] = Quota(guaranteed, guaranteed + rng.randint(0, 16))
        tenants[tenant_id] = Tenant(
            tenant_id,
            quotas,
            weight=rng.choice((0.5, 1.0, 2.0)),
            max_running_jobs=rng.choice((None, None, 1, 3, 10)),
            usage=rng.uniform(0, 100),
            budget_ok=rng.random() > 0.1,
        )
    prices = {A100: 2 / HOUR, H100: 4 / HOUR, L4: 0.7 / HOUR}
    return Snapshot(NOW, tuple(machines), tuple(busy), tuple(jobs), tenants, prices)


def check_invariants(snapshot: Snapshot, decisions: Decisions) -> None:
    machines = {m.id: m for m in snapshot.machines}
    jobs = {j.job_id: j for j in snapshot.queued}
    used: set[tuple[int, int]] = set()
    held = Counter()
    for job in snapshot.running:
        held[job.tenant_id, job.resource_class] += job.gpus
    placed_ids = [p.job_id for p in decisions.placements]
    assert len(placed_ids) == len(set(placed_ids))
    running_jobs = Counter(job.tenant_id for job in snapshot.running)
    for placement in decisions.placements:
        job, box = jobs[placement.job_id], machines[placement.machine_id]
        tenant = snapshot.tenants[job.tenant_id]
        assert box.schedulable and box.resource_class == job.resource_class
        assert not job.runtime or job.runtime in box.runtimes
        assert len(placement.slots) == job.gpus
        assert set(placement.slots) <= box.free
        for slot in placement.slots:
            assert (box.id, slot) not in used
            used.add((box.id, slot))
        assert tenant.budget_ok
        held[job.tenant_id, job.resource_class] += job.gpus
        assert held[job.tenant_id, job.resource_class] <= tenant.quotas[job.resource_class].limit
        running_jobs[job.tenant_id] += 1
        if tenant.max_running_jobs is not None:
            assert running_jobs[job.tenant_id] <= tenant.max_running_jobs
    waiting_ids = [w.job_id for w in decisions.waiting]
    assert len(waiting_ids) == len(set(waiting_ids))
    assert sorted(placed_ids + waiting_ids) == sorted(jobs)
    positions = defaultdict(list)
    for w in decisions.waiting:
        assert w.reason
        positions[jobs[w.job_id].resource_class].append(w.position)
    for values in positions.values():
        assert sorted(values) == list(range(1, len(values) + 1))
    victims = [p.job_id for p in decisions.preemptions]
    assert len(victims) == len(set(victims))
    by_id = {job.job_id: job for job in snapshot.running}
    for preemption in decisions.preemptions:
        victim, beneficiary = by_id[preemption.job_id], jobs[preemption.for_job_id]
        assert victim.resource_class == beneficiary.resource_class
        assert (
            not beneficiary.runtime or beneficiary.runtime in machines[victim.machine_id].runtimes
        )
        assert preemption.for_job_id not in placed_ids
    reclaiming = Counter()
    for job_id in {p.for_job_id for p in decisions.preemptions}:
        reclaiming[jobs[job_id].tenant_id, jobs[job_id].resource_class] += jobs[job_id].gpus
        assert "reclaiming" in next(w.reason for w in decisions.waiting if w.job_id == job_id)
    for (tenant_id, cls), gpus in reclaiming.items():
        before = sum(
            j.gpus for j in snapshot.running if j.tenant_id == tenant_id and j.resource_class == cls
        )
        assert before + gpus <= snapshot.tenants[tenant_id].quotas[cls].guaranteed
    lost = Counter()
    for preemption in decisions.preemptions:
        victim = by_id[preemption.job_id]
        lost[victim.tenant_id, victim.resource_class] += victim.gpus
    for (tenant_id, cls), gpus in lost.items():
        before = sum(
            j.gpus for j in snapshot.running if j.tenant_id == tenant_id and j.resource_class == cls
        )
        assert before - gpus >= snapshot.tenants[tenant_id].quotas.get(cls, NO_ACCESS).guaranteed


@pytest.mark.parametrize("policy", [schedule, fifo_schedule], ids=["policy", "fifo"])
def test_random_snapshots_keep_the_invariants(policy):
    rng = random.Random(20240601)  # noqa: S311 (seeded test data)
    for _ in range(400):
        snapshot = random_snapshot(rng)
        decisions = policy(snapshot)
        check_invariants(snapshot, decisions)
        assert policy(snapshot) == decisions


@pytest.mark.parametrize("policy", [schedule, fifo_schedule], ids=["policy", "fifo"])
def test_a_job_is_never_placed_on_a_machine_lacking_its_runtime(policy):
    # check_invariants holds placements and preemptions to the job's runtime; these snapshots
    # mix machines with and without each runtime, and jobs needing one or none.
    rng = random.Random(20261206)  # noqa: S311 (seeded test data)
    needing_placed = 0
    for _ in range(400):
        snapshot = random_snapshot(rng, runtimes=True)
        decisions = policy(snapshot)
        check_invariants(snapshot, decisions)
        assert policy(snapshot) == decisions
        jobs = {j.job_id: j for j in snapshot.queued}
        needing_placed += sum(1 for p in decisions.placements if jobs[p.job_id].runtime)
    assert needing_placed > 100  # the property was exercised, not vacuously true


def test_decisions_do_not_depend_on_input_order():
    rng = random.Random(7)  # noqa: S311 (seeded test data)
    for _ in range(100):
        snapshot = random_snapshot(rng)
        shuffled = Snapshot(
            snapshot.now,
            tuple(rng.sample(snapshot.machines, len(snapshot.machines))),
            tuple(rng.sample(snapshot.running, len(snapshot.running))),
            tuple(rng.sample(snapshot.queued, len(snapshot.queued))),
            snapshot.tenants,
            snapshot.prices,
        )
        assert schedule(shuffled) == schedule(snapshot)


@pytest.mark.slow
def test_scheduler_imports_no_django():
    code = "import sys, jobs.scheduler; sys.exit('django' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
