"""Samples a running attempt's use of its slot: its whole process tree's CPU time and resident
memory from /proc (a warm child, a bubblewrap sandbox and whatever they start), and its GPUs
through NVML (jobs.runner.nvml). A failed reading never fails the job: it is logged once and
that part is left out."""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from pathlib import Path

from django.utils import timezone

from jobs.utilization import Sample

from .nvml import Nvml, NvmlUnavailable

logger = logging.getLogger(__name__)

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses), or None
    for a process gone meanwhile."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """`root` and every process below it, from each process's parent in /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children[int(fields[1])].append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


def tree_usage(root: int) -> tuple[float, int] | None:
    """(CPU seconds, resident bytes) of `root`'s process tree; None once `root` is gone.

    CPU counts each process's own time and that of the children it has reaped, so a process that
    ends inside the tree keeps its seconds in its parent's count."""
    cpu_ticks, pages, seen = 0, 0, False
    for pid in process_tree(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        seen = True
        # utime, stime, cutime, cstime (stat fields 14-17) and rss (24), counted from 3.
        cpu_ticks += sum(int(value) for value in fields[11:15])
        pages += int(fields[21])
    if not seen:
        return None
    return cpu_ticks / CLOCK_TICKS, pages * PAGE_BYTES


class Sampler:
    """Takes a sample of the attempt every `interval` seconds, when the runner's loop asks
    (`take`), and hands them over in its reports (`drain`).

    Its count of stored samples is the service's: when it passes `max_samples`, the report asks
    the service to keep every other one, and sampling slows to half as often, so that a week-long
    job's series stays bounded and evenly spaced."""

    def __init__(self, *, root_pid: int, gpu_indices: list[int], interval: float, max_samples: int):
        self.root_pid, self.gpu_indices = root_pid, list(gpu_indices)
        self.interval, self.max_samples = interval, max(2, max_samples)
        self.pending: list[Sample] = []
        self.stored = 0
        self.broken = False
        self.nvml: Nvml | None = None
        if self.gpu_indices:
            try:
                self.nvml = Nvml()
            except NvmlUnavailable as exc:
                logger.warning("GPU utilization is not sampled: %s", exc)
        self.last_at = time.monotonic()
        self.last_cpu = self._cpu_seconds()
        self.due = self.last_at + interval

    def _cpu_seconds(self) -> float | None:
        try:
            usage = tree_usage(self.root_pid)
        except (OSError, ValueError, IndexError) as exc:  # a /proc without the expected fields
            logger.warning("CPU utilization is not sampled: %s", exc)
            return None
        return None if usage is None else usage[0]

    def take(self, now: float) -> None:
        """Read the tree and the GPUs, if the interval has passed. Sampling is an extra: should
        a reading fail in a way not foreseen, the attempt goes on unsampled, said once."""
        if self.broken or now < self.due:
            return
        self.due = now + self.interval
        try:
            self._take(now)
        except Exception:
            logger.exception("utilization sampling stopped for this attempt")
            self.broken = True
            self.close()

    def _take(self, now: float) -> None:
        try:
            usage = tree_usage(self.root_pid)
        except (OSError, ValueError, IndexError):
            usage = None
        if usage is None:
            return  # ended between readings: its last interval is not sampled
        cpu_seconds, memory = usage
        elapsed = now - self.last_at
        # A process reparented out of the tree takes its time with it: never a negative rate.
        cores = max(0.0, cpu_seconds - self.last_cpu) / elapsed if self.last_cpu is not None else 0
        self.last_at, self.last_cpu = now, cpu_seconds
        self.pending.append(
            Sample(
                at=timezone.now(),
                seconds=round(elapsed, 3),
                cpu_cores=round(cores, 3),
                memory_bytes=memory,
                **self._gpu(),
            )
        )

    def _gpu(self) -> dict:
        if self.nvml is None:
            return {}
        try:
            readings = self.nvml.read(self.gpu_indices)
        except NvmlUnavailable as exc:
            logger.warning("GPU utilization is no longer sampled: %s", exc)
            self.close()
            return {}
        if not readings:
            return {}
        fullest = max(readings, key=lambda r: r.memory_used)
        return {
            "gpu_utilization": round(sum(r.utilization for r in readings) / len(readings), 1),
            "gpu_memory_bytes": fullest.memory_used,
            "gpu_memory_total_bytes": fullest.memory_total,
        }

    def drain(self) -> tuple[list[Sample], bool]:
        """The samples taken since the last report, and whether the stored ones are to be
        thinned to every other one first."""
        samples, self.pending = self.pending, []
        self.stored += len(samples)
        thin = self.stored > self.max_samples
        if thin:
            # The service keeps the 1st, 3rd, 5th... of its rows: half, rounded up.
            self.stored -= self.stored // 2
            self.interval *= 2
        return samples, thin

    def close(self) -> None:
        if self.nvml is not None:
            self.nvml.close()
            self.nvml = None
