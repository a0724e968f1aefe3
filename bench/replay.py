"""Replay a GPU cluster trace through the scheduler in virtual time: the policy against FIFO.

    .venv/bin/python bench/replay.py --trace ../shared/traces/openb_pod_list_default.csv \\
        --nodes ../shared/traces/openb_node_list_gpu_node.csv [--load 32] [--scale 0.0625] \\
        [--max-gap 60] [--tenants 20] [--seed 1] [--tick 30] [--limit N]

The defaults (arrivals 32x denser, 1/16 of the nodes) put the pool under steady contention;
the whole default trace replays in seconds, so --limit is off by default.

Reads any file in the Alibaba `openb` format (see /work/shared/traces/README.md) and runs the
same event-driven simulation twice, once with `schedule` and once with `fifo_schedule`. The
rules it applies, printed with the results:

- Tasks: every row with num_gpu >= 1, whatever its pod_phase; a fractional GPU (gpu_milli <
  1000) takes a whole one. Duration = deletion_time - creation_time; rows with duration <= 0
  are skipped. Priority from qos: Guaranteed 3, LS 2, Burstable 1, BE 0.
- Classes: a node's `model` is its resource class and `gpu` its slot count. A task with a
  gpu_spec takes the first listed model the cluster has; one without may use any model, so it
  is given one by a seeded hash, weighted by class capacity, among classes with a node big
  enough for it.
- Contention: the full cluster is lightly loaded, so inter-arrival times are divided by --load,
  gaps longer than --max-gap are cut to it (the trace's first months are nearly idle), and the
  cluster keeps --scale of each model's nodes (evenly spaced). Durations are kept.
- Tenants: the task name's seeded hash picks one of --tenants tenants by a Zipf law (s = 1.2),
  so volumes are skewed. Equal weights; per class guaranteed = floor(capacity / tenants),
  limit = capacity.
- Jobs declare max_runtime = 1.5 x their actual remaining duration (for reservations).
- Preemption: a victim keeps the work up to its last checkpoint (every 10 virtual minutes of
  its run), loses the rest and is queued again with its original submit time.
- Fair-share usage: spend (GPU-seconds x class price) decayed with a 1 h half-life.
- Ticks: a scheduling pass runs at the next multiple of --tick seconds after any arrival,
  completion or preemption.

Metrics: utilization = busy GPU-seconds / (capacity x span) over the arrival window (first to
last arrival), lost work included; job completion time and waiting time (time queued, over all
attempts) per task; Jain's index of GPUs held (over weight) among tenants with queued work,
averaged over passes where at least two tenants are backlogged; preemptions. Ends with one
`RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import hashlib
import heapq
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
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

QOS_PRIORITY = {"Guaranteed": 3, "LS": 2, "Burstable": 1, "BE": 0}
# Money per GPU-hour; the trace anonymises some models (G2, G3), so these are stated guesses.
PRICE_PER_GPU_HOUR = {
    "A10": 1.0,
    "G2": 1.5,
    "G3": 2.0,
    "P100": 0.8,
    "T4": 0.5,
    "V100M16": 1.5,
    "V100M32": 2.0,
}
DEFAULT_PRICE_PER_GPU_HOUR = 1.0
ZIPF_S = 1.2
CHECKPOINT_EVERY_S = 600.0
HALF_LIFE_S = 3600.0
RUNTIME_ESTIMATE_FACTOR = 1.5


@dataclass(frozen=True)
class Task:
    job_id: int
    name: str
    gpus: int
    spec: tuple[str, ...]
    priority: int
    arrival: float
    duration: float


@dataclass
class Node:
    id: int
    model: str
    slots: int


def _unit_hash(seed: int, name: str, salt: str) -> float:
    digest = hashlib.blake2b(f"{seed}:{salt}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def read_nodes(path: Path, scale: float) -> list[Node]:
    by_model: dict[str, list[tuple[str, int]]] = defaultdict(list)
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            gpus = int(row["gpu"])
            if gpus > 0:
                by_model[row["model"]].append((row["sn"], gpus))
    nodes = []
    for model in sorted(by_model):
        rows = sorted(by_model[model])
        keep = max(1, round(len(rows) * scale))
        for i in range(keep):
            _, gpus = rows[i * len(rows) // keep]
            nodes.append(Node(len(nodes) + 1, model, gpus))
    return nodes


def read_tasks(
    path: Path, load: float, max_gap: float, limit: int | None
) -> tuple[list[Task], int]:
    rows = []
    skipped = 0
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            gpus = int(float(row["num_gpu"] or 0))
            if gpus < 1:
                continue
            created = float(row["creation_time"])
            duration = float(row["deletion_time"]) - created
            if duration <= 0:
                skipped += 1
                continue
            rows.append((created, row["name"], gpus, row, duration))
    rows.sort(key=lambda r: (r[0], r[1]))
    if limit is not None:
        rows = rows[:limit]
    tasks = []
    arrival = previous = rows[0][0] if rows else 0.0
    for created, name, gpus, row, duration in rows:
        arrival += min((created - previous) / load, max_gap)
        previous = created
        tasks.append(
            Task(
                job_id=len(tasks) + 1,
                name=name,
                gpus=gpus,
                spec=tuple(s for s in (row.get("gpu_spec") or "").split("|") if s),
                priority=QOS_PRIORITY.get(row.get("qos", ""), 0),
                arrival=arrival,
                duration=duration,
            )
        )
    return tasks, skipped


def class_assigner(nodes: list[Node], seed: int) -> Callable[[Task], str | None]:
    """The rule that gives each task its resource class (see the module docstring)."""
    largest: dict[str, int] = defaultdict(int)
    capacity: dict[str, int] = defaultdict(int)
    for node in nodes:
        largest[node.model] = max(largest[node.model], node.slots)
        capacity[node.model] += node.slots

    def assign(task: Task) -> str | None:
        for model in task.spec:
            if model in capacity:
                return model
        if task.spec:
            return task.spec[0]  # a model this cluster lacks: the job waits, saying so
        fitting = [m for m in sorted(capacity) if largest[m] >= task.gpus]
        if not fitting:
            return None
        point = _unit_hash(seed, task.name, "class") * sum(capacity[m] for m in fitting)
        for model in fitting:
            point -= capacity[model]
            if point < 0:
                return model
        return fitting[-1]

    return assign


def tenant_assigner(tenants: int, seed: int) -> Callable[[Task], int]:
    """Tenant ids 1..tenants by a Zipf law over the task name's seeded hash."""
    cumulative = []
    total = 0.0
    for rank in range(1, tenants + 1):
        total += 1 / rank**ZIPF_S
        cumulative.append(total)

    def assign(task: Task) -> int:
        point = _unit_hash(seed, task.name, "tenant") * total
        return min(bisect.bisect_right(cumulative, point), tenants - 1) + 1

    return assign


@dataclass
class JobState:
    task: Task
    tenant_id: int
    resource_class: str
    remaining: float
    running_s: float = 0.0
    attempt: int = 0
    started_at: float = 0.0
    machine_id: int = 0
    slots: tuple[int, ...] = ()


@dataclass
class Outcome:
    completions: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    busy_gpu_s: float = 0.0
    lost_gpu_s: float = 0.0
    jain: list[float] = field(default_factory=list)
    preemptions: int = 0
    ticks: int = 0
    span: float = 0.0
    wall_s: float = 0.0
    unplaceable: int = 0


class Simulation:
    """One run of the pool in virtual time under one scheduling function."""

    def __init__(
        self,
        policy: Callable[[Snapshot], Decisions],
        tasks: list[Task],
        nodes: list[Node],
        tenants: int,
        seed: int,
        tick_s: float,
    ) -> None:
        self.policy = policy
        self.tick_s = tick_s
        self.nodes = {node.id: node for node in nodes}
        self.free = {node.id: set(range(node.slots)) for node in nodes}
        self.machines = {node.id: self._machine(node.id) for node in nodes}
        capacity: dict[str, int] = defaultdict(int)
        for node in nodes:
            capacity[node.model] += node.slots
        self.quotas = {m: Quota(guaranteed=c // tenants, limit=c) for m, c in capacity.items()}
        self.prices = {
            model: PRICE_PER_GPU_HOUR.get(model, DEFAULT_PRICE_PER_GPU_HOUR) / 3600
            for model in capacity
        }
        self.tenant_ids = list(range(1, tenants + 1))
        self.usage = dict.fromkeys(self.tenant_ids, 0.0)
        self.spend_rate = dict.fromkeys(self.tenant_ids, 0.0)
        self.usage_at = 0.0
        self.jobs: dict[int, JobState] = {}
        self.events: list[tuple[float, int, str, int, int]] = []
        self.queued: dict[int, Queued] = {}
        self.running: dict[int, Running] = {}
        self.held: dict[int, int] = defaultdict(int)
        self.pending_tick: set[float] = set()
        self.outcome = Outcome()
        self.window_start = tasks[0].arrival if tasks else 0.0
        self.window_end = tasks[-1].arrival if tasks else 0.0
        self._seq = 0
        class_of, tenant_of = class_assigner(nodes, seed), tenant_assigner(tenants, seed)
        for task in tasks:
            resource_class = class_of(task)
            if resource_class is None:
                self.outcome.unplaceable += 1
                continue
            self.jobs[task.job_id] = JobState(task, tenant_of(task), resource_class, task.duration)
            self._push(task.arrival, "arrive", task.job_id, 0)

    def _machine(self, machine_id: int) -> Machine:
        node = self.nodes[machine_id]
        return Machine(machine_id, node.model, node.slots, frozenset(self.free[machine_id]))

    def _push(self, at: float, kind: str, job_id: int, attempt: int) -> None:
        self._seq += 1
        heapq.heappush(self.events, (at, self._seq, kind, job_id, attempt))

    def _want_tick(self, now: float) -> None:
        at = math.ceil(now / self.tick_s) * self.tick_s
        if at not in self.pending_tick:
            self.pending_tick.add(at)
            self._push(at, "tick", 0, 0)

    def _decay_usage(self, now: float) -> None:
        elapsed = now - self.usage_at
        if elapsed <= 0:
            return
        rate = math.log(2) / HALF_LIFE_S
        keep = math.exp(-rate * elapsed)
        for tenant_id in self.tenant_ids:
            self.usage[tenant_id] = (
                self.usage[tenant_id] * keep + self.spend_rate[tenant_id] * (1 - keep) / rate
            )
        self.usage_at = now

    def _queue(self, job: JobState) -> None:
        self.queued[job.task.job_id] = Queued(
            job_id=job.task.job_id,
            tenant_id=job.tenant_id,
            resource_class=job.resource_class,
            gpus=job.task.gpus,
            priority=job.task.priority,
            submitted_at=job.task.arrival,
            max_runtime_s=job.remaining * RUNTIME_ESTIMATE_FACTOR,
        )

    def _stop(self, job: JobState, now: float) -> float:
        """Take a job off its machine; returns how long this attempt ran."""
        ran = now - job.started_at
        self.free[job.machine_id].update(job.slots)
        self.machines[job.machine_id] = self._machine(job.machine_id)
        del self.running[job.task.job_id]
        self.held[job.tenant_id] -= job.task.gpus
        self.spend_rate[job.tenant_id] -= job.task.gpus * self.prices[job.resource_class]
        # Utilization counts only the arrival window; the drain after it says little.
        inside = min(now, self.window_end) - min(job.started_at, self.window_end)
        self.outcome.busy_gpu_s += inside * job.task.gpus
        job.running_s += ran
        return ran

    def _tick(self, now: float) -> None:
        self._decay_usage(now)
        tenants = {
            tenant_id: Tenant(id=tenant_id, quotas=self.quotas, usage=self.usage[tenant_id])
            for tenant_id in self.tenant_ids
        }
        snapshot = Snapshot(
            now=now,
            machines=tuple(self.machines.values()),
            running=tuple(self.running.values()),
            queued=tuple(self.queued.values()),
            tenants=tenants,
            prices=self.prices,
        )
        decisions = self.policy(snapshot)
        self.outcome.ticks += 1
        for preemption in decisions.preemptions:
            job = self.jobs[preemption.job_id]
            ran = self._stop(job, now)
            kept = math.floor(ran / CHECKPOINT_EVERY_S) * CHECKPOINT_EVERY_S
            job.remaining -= kept
            self.outcome.lost_gpu_s += (ran - kept) * job.task.gpus
            self.outcome.preemptions += 1
            job.attempt += 1  # its pending completion event is now stale
            self._queue(job)
        if decisions.preemptions:
            self._want_tick(now + self.tick_s)
        for placement in decisions.placements:
            job = self.jobs[placement.job_id]
            del self.queued[placement.job_id]
            job.started_at, job.machine_id, job.slots = now, placement.machine_id, placement.slots
            self.free[placement.machine_id].difference_update(placement.slots)
            self.machines[placement.machine_id] = self._machine(placement.machine_id)
            self.running[placement.job_id] = Running(
                job_id=placement.job_id,
                tenant_id=job.tenant_id,
                resource_class=job.resource_class,
                gpus=job.task.gpus,
                machine_id=placement.machine_id,
                priority=job.task.priority,
                started_at=now,
                expected_end=now + job.remaining * RUNTIME_ESTIMATE_FACTOR,
            )
            self.held[job.tenant_id] += job.task.gpus
            self.spend_rate[job.tenant_id] += job.task.gpus * self.prices[job.resource_class]
            self._push(now + job.remaining, "finish", placement.job_id, job.attempt)
        self._record_fairness()

    def _record_fairness(self) -> None:
        backlogged = {job.tenant_id for job in self.queued.values()}
        if len(backlogged) < 2:
            return
        shares = [self.held[tenant_id] for tenant_id in backlogged]  # equal weights
        squares = sum(x * x for x in shares)
        if squares:
            self.outcome.jain.append(sum(shares) ** 2 / (len(shares) * squares))

    def run(self) -> Outcome:
        started = time.perf_counter()
        self.usage_at = self.window_start
        while self.events:
            now, _, kind, job_id, attempt = heapq.heappop(self.events)
            if kind == "arrive":
                self._queue(self.jobs[job_id])
                self._want_tick(now)
            elif kind == "finish":
                job = self.jobs[job_id]
                if attempt != job.attempt:
                    continue
                self._decay_usage(now)
                self._stop(job, now)
                completion = now - job.task.arrival
                self.outcome.completions.append(completion)
                self.outcome.waits.append(completion - job.running_s)
                self._want_tick(now)
            else:
                self.pending_tick.discard(now)
                if self.queued:
                    self._tick(now)
        self.outcome.span = self.window_end - self.window_start
        self.outcome.wall_s = time.perf_counter() - started
        return self.outcome


def summarize(outcome: Outcome, capacity: int) -> dict[str, float]:
    completions = sorted(outcome.completions)
    return {
        "util": round(outcome.busy_gpu_s / (capacity * outcome.span), 4) if outcome.span else 0.0,
        "jct_mean_s": round(statistics.fmean(completions), 1) if completions else 0.0,
        "jct_p95_s": round(completions[int(0.95 * (len(completions) - 1))], 1)
        if completions
        else 0.0,
        "wait_mean_s": round(statistics.fmean(outcome.waits), 1) if outcome.waits else 0.0,
        "jain": round(statistics.fmean(outcome.jain), 4) if outcome.jain else 1.0,
        "preemptions": outcome.preemptions,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, required=True)
    parser.add_argument("--nodes", type=Path, required=True)
    parser.add_argument("--load", type=float, default=32.0, help="divide inter-arrival times by")
    parser.add_argument(
        "--max-gap", type=float, default=60.0, help="longest gap between arrivals, after --load"
    )
    parser.add_argument("--scale", type=float, default=0.0625, help="fraction of nodes kept")
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tick", type=float, default=30.0, help="virtual seconds between passes")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N tasks")
    args = parser.parse_args()

    nodes = read_nodes(args.nodes, args.scale)
    tasks, skipped = read_tasks(args.trace, args.load, args.max_gap, args.limit)
    gpus = sum(node.slots for node in nodes)
    models = defaultdict(int)
    for node in nodes:
        models[node.model] += node.slots
    window = (tasks[-1].arrival - tasks[0].arrival) / 3600 if tasks else 0.0
    print(
        f"trace: {args.trace.name}: {len(tasks)} GPU tasks replayed"
        f"{f' (first {args.limit})' if args.limit else ' (all)'}, {skipped} skipped with "
        f"duration <= 0; arrival window {window:.1f} virtual hours"
    )
    print(
        f"cluster: {len(nodes)} nodes, {gpus} GPUs ({args.scale:g} of each model's nodes): "
        + ", ".join(f"{m} {c}" for m, c in sorted(models.items()))
    )
    print(
        f"load: inter-arrival times / {args.load:g}, gaps cut to {args.max_gap:g} s; "
        f"tenants: {args.tenants} (Zipf s={ZIPF_S}, seed {args.seed}); tick {args.tick:g} s; "
        f"checkpoint every {CHECKPOINT_EVERY_S:g} s; "
        f"max_runtime = {RUNTIME_ESTIMATE_FACTOR:g} x duration"
    )
    results = {}
    outcomes = {}
    for name, policy in (("ours", schedule), ("fifo", fifo_schedule)):
        simulation = Simulation(policy, tasks, nodes, args.tenants, args.seed, args.tick)
        outcomes[name] = simulation.run()
        results[name] = summarize(outcomes[name], gpus)

    header = (
        f"{'policy':<6} {'util':>6} {'JCT p50 s':>10} {'JCT mean s':>11} {'JCT p95 s':>10} "
        f"{'wait mean s':>12} {'Jain':>6} {'preempt':>8} {'lost GPU-h':>11} {'done':>6} "
        f"{'passes':>7} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for name, row in results.items():
        outcome = outcomes[name]
        median = statistics.median(outcome.completions) if outcome.completions else 0.0
        print(
            f"{name:<6} {row['util']:>6.3f} {median:>10,.0f} "
            f"{row['jct_mean_s']:>11,.0f} {row['jct_p95_s']:>10,.0f} "
            f"{row['wait_mean_s']:>12,.0f} {row['jain']:>6.3f} {row['preemptions']:>8} "
            f"{outcome.lost_gpu_s / 3600:>11.1f} {len(outcome.completions):>6} "
            f"{outcome.ticks:>7} {outcome.wall_s:>7.1f}"
        )
    print(f"tasks larger than any node, not replayed: {outcomes['ours'].unplaceable}")
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
