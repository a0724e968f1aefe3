"""Time one scheduling pass on a large pool: the policy against the FIFO baseline.

The snapshot (seeded): 250 machines of 8 GPUs in three classes (2,000 GPUs), about 74% busy with
830-odd running jobs of 1 to 8 GPUs, so that free slots are fragmented; 500 tenants whose activity
follows a Zipf law, the 40 largest holding guarantees, the rest borrowing only; 10,000 queued
jobs of 1, 2, 4 or 8 GPUs. Target: one pass p99 < 100 ms and >= 500 placements/s.

    .venv/bin/python bench/scheduler.py [--runs 100] [--seed 7]

Prints a table and ends with one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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

CLASSES = {  # name: (machines, money per GPU-second)
    "h100-80gb": (60, 4.00 / 3600),
    "a100-40gb": (90, 2.00 / 3600),
    "l4-24gb": (100, 0.70 / 3600),
}
SLOTS = 8
TENANTS = 500
GUARANTEED_TENANTS = 40
QUEUED = 10_000
BUSY_FRACTION = 0.70
SIZES = (1, 2, 4, 8)
SIZE_WEIGHTS = (0.55, 0.25, 0.12, 0.08)
NOW = 1_750_000_000.0


def zipf_weights(count: int, exponent: float) -> list[float]:
    return [1 / (rank**exponent) for rank in range(1, count + 1)]


def make_snapshot(seed: int) -> Snapshot:
    rng = random.Random(seed)  # noqa: S311 (seeded test data, not secrets)
    tenant_ids = list(range(1, TENANTS + 1))
    activity = zipf_weights(TENANTS, 1.1)
    capacity = {name: machines * SLOTS for name, (machines, _) in CLASSES.items()}

    machines = []
    running = []
    job_id = 1
    machine_id = 1
    for name, (count, _) in CLASSES.items():
        for _ in range(count):
            busy: list[int] = []
            target = rng.choice((0, 4, 6, 7, 8, 8, 8))  # averages about 70% busy
            slots = list(range(SLOTS))
            while len(busy) < target:
                gpus = min(
                    rng.choices(SIZES, SIZE_WEIGHTS)[0],
                    target - len(busy),
                )
                taken = slots[len(busy) : len(busy) + gpus]
                busy.extend(taken)
                started = NOW - rng.uniform(60, 20 * 3600)
                running.append(
                    Running(
                        job_id=job_id,
                        tenant_id=rng.choices(tenant_ids, activity)[0],
                        resource_class=name,
                        gpus=gpus,
                        machine_id=machine_id,
                        priority=rng.randint(0, 3),
                        started_at=started,
                        expected_end=started + rng.uniform(1, 24) * 3600,
                    )
                )
                job_id += 1
            machines.append(
                Machine(
                    id=machine_id,
                    resource_class=name,
                    slots=SLOTS,
                    free=frozenset(range(SLOTS)) - frozenset(busy),
                    schedulable=rng.random() > 0.02,
                )
            )
            machine_id += 1

    tenants = {}
    for rank, tenant_id in enumerate(tenant_ids):
        quotas = {}
        for name, cap in capacity.items():
            # The largest tenants buy guarantees (about half the pool in all); everyone may
            # borrow up to a quarter of a class.
            guaranteed = cap // (2 * GUARANTEED_TENANTS) if rank < GUARANTEED_TENANTS else 0
            quotas[name] = Quota(guaranteed=guaranteed, limit=max(guaranteed, cap // 4))
        tenants[tenant_id] = Tenant(
            id=tenant_id,
            quotas=quotas,
            weight=2.0 if rank < GUARANTEED_TENANTS else 1.0,
            max_running_jobs=rng.choice((None, None, 20, 50)),
            usage=rng.lognormvariate(3, 1.5),
            budget_ok=rng.random() > 0.02,
            label=f"tenant-{tenant_id}",
        )

    class_names = list(CLASSES)
    class_weights = [count for count, _ in CLASSES.values()]
    queued = tuple(
        Queued(
            job_id=job_id + offset,
            tenant_id=rng.choices(tenant_ids, activity)[0],
            resource_class=rng.choices(class_names, class_weights)[0],
            gpus=rng.choices(SIZES, SIZE_WEIGHTS)[0],
            priority=rng.randint(0, 3),
            submitted_at=NOW - rng.uniform(0, 6 * 3600),
            max_runtime_s=rng.uniform(0.25, 24) * 3600,
        )
        for offset in range(QUEUED)
    )
    return Snapshot(
        now=NOW,
        machines=tuple(machines),
        running=tuple(running),
        queued=queued,
        tenants=tenants,
        prices={name: price for name, (_, price) in CLASSES.items()},
    )


REASON_KINDS = (  # (marker in the reason, short name), first match wins
    ("reserved:", "reserved"),
    ("reclaiming", "reclaiming"),
    ("reserved larger job", "behind a reservation"),
    ("FIFO queue", "behind the FIFO head"),
    ("over quota", "over quota"),
    ("running jobs", "job limit"),
    ("budget", "budget"),
    ("no machine has", "too large"),
    ("waiting for", "no room"),
)


def reason_kind(reason: str) -> str:
    return next((name for marker, name in REASON_KINDS if marker in reason), reason)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(function, snapshot: Snapshot, runs: int) -> tuple[list[float], Decisions]:
    for _ in range(3):
        decisions = function(snapshot)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        decisions = function(snapshot)
        times.append(time.perf_counter() - start)
    return times, decisions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    snapshot = make_snapshot(args.seed)
    gpus = sum(m.slots for m in snapshot.machines)
    free = sum(len(m.free) for m in snapshot.machines if m.schedulable)
    print(
        f"snapshot: {len(snapshot.machines)} machines, {gpus} GPUs ({free} free and schedulable), "
        f"{len(snapshot.running)} running, {len(snapshot.queued)} queued, "
        f"{len(snapshot.tenants)} tenants; {args.runs} timed passes after 3 warm-up"
    )
    rows = {}
    for name, function in (("ours", schedule), ("fifo", fifo_schedule)):
        times, decisions = measure(function, snapshot, args.runs)
        p50 = statistics.median(times)
        placed = len(decisions.placements)
        placed_gpus = sum(len(p.slots) for p in decisions.placements)
        rows[name] = {
            "p50_ms": p50 * 1000,
            "p99_ms": percentile(times, 0.99) * 1000,
            "placements": placed,
            "placed_gpus": placed_gpus,
            "preemptions": len(decisions.preemptions),
            "placements_per_s": placed / p50,
        }
        rows[name]["reasons"] = Counter(reason_kind(w.reason) for w in decisions.waiting)

    header = (
        f"{'policy':<6} {'p50 ms':>8} {'p99 ms':>8} {'placed':>7} {'GPUs':>6} "
        f"{'preempt':>8} {'placements/s':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        print(
            f"{name:<6} {row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['placements']:>7} "
            f"{row['placed_gpus']:>6} {row['preemptions']:>8} {row['placements_per_s']:>13,.0f}"
        )
    for name, row in rows.items():
        kinds = ", ".join(f"{kind} {count}" for kind, count in row["reasons"].most_common())
        print(f"{name} waiting: {kinds}")
    result = {
        "p50_ms": round(rows["ours"]["p50_ms"], 2),
        "p99_ms": round(rows["ours"]["p99_ms"], 2),
        "placements_per_s": round(rows["ours"]["placements_per_s"]),
        "fifo_placements_per_s": round(rows["fifo"]["placements_per_s"]),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
