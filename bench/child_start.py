"""A job's warm child: started as its own interpreter (before, `python -m jobs.runner.child
--warm`) against forked from the pool process's zygote (jobs.runner.zygote), in the same run.

For each side, alternating, one child at a time on an otherwise idle slot: the wall time from
asking for the child to its READY line (it has imported what a job needs and waits for its
folder), the CPU it used to get there (utime + stime from /proc), and, once waiting, its memory
(RSS and PSS from /proc/<pid>/smaps_rollup: a forked child shares the zygote's pages until it
writes them). The zygote's own start (its imports, once per pool process) is timed once.

    .venv/bin/python -m bench.child_start            # 10 of each; ~2 minutes
    .venv/bin/python -m bench.child_start --quick    # 3 of each

No Django, database or broker: only the processes a pool process starts. Medians and ranges;
`RESULT {json}` last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from jobs.runner.isolation import CHILD_COMMAND, READY, WaitingChild, child_threads
from jobs.runner.zygote import Zygote

REPO = Path(__file__).resolve().parents[1]
WARM_COMMAND = (*CHILD_COMMAND, "--warm")
THREADS = child_threads(1)  # a one-slot worker's: all of the machine's cores
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def memory_mb(pid: int) -> tuple[float, float]:
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        values[name.rstrip(":")] = int(value) / 1024
    return values["Rss"], values["Pss"]


def measure(start) -> dict:
    began = time.perf_counter()
    waiting = start()
    line = waiting.process.stdout.readline().rstrip("\n")
    ready = time.perf_counter() - began
    if line != READY:
        raise SystemExit(f"the child said {line!r}, not {READY!r}: {waiting.process.stderr.read()}")
    pid = waiting.process.pid
    figures = {"ready_s": ready, "cpu_s": cpu_s(pid)}
    figures["rss_mb"], figures["pss_mb"] = memory_mb(pid)
    waiting.discard()
    return figures


def summary(runs: list[dict], key: str) -> str:
    values = [run[key] for run in runs]
    return f"{statistics.median(values):9.3f} {min(values):9.3f} {max(values):9.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 runs of each, not 10")
    runs = 3 if parser.parse_args().quick else 10
    os.environ["PYTHONPATH"] = str(REPO)  # children start in /

    began = time.perf_counter()
    zygote = Zygote(threads=THREADS)
    while not zygote.ready(timeout=0.05):
        pass
    zygote_ready_s = time.perf_counter() - began
    zygote_cpu_s = cpu_s(zygote.process.pid)
    sides = {
        "started": lambda: WaitingChild(threads=THREADS, command=WARM_COMMAND),
        "forked": lambda: WaitingChild(threads=THREADS, zygote=zygote),
    }
    results: dict[str, list[dict]] = {side: [] for side in sides}
    try:
        for number in range(runs):
            for side, start in sides.items():
                results[side].append(measure(start))
            print(f"  run {number + 1}/{runs}", flush=True)
        zygote_rss, zygote_pss = memory_mb(zygote.process.pid)
    finally:
        zygote.stop()

    print(
        f"\nA job's warm child, {runs} of each, alternating; {THREADS} threads per child; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"{'':42}{'median':>9} {'min':>9} {'max':>9}")
    rows = (
        ("ask -> READY, wall s", "ready_s"),
        ("CPU to READY, s", "cpu_s"),
        ("waiting, RSS MB", "rss_mb"),
        ("waiting, PSS MB", "pss_mb"),
    )
    for side in sides:
        for label, key in rows:
            print(f"  {f'{side}: {label}':<42}{summary(results[side], key)}")
    print(
        f"  the zygote, once per pool process: {zygote_ready_s:.3f} s to READY, "
        f"{zygote_cpu_s:.2f} s CPU, RSS {zygote_rss:.0f} MB, PSS {zygote_pss:.0f} MB"
    )
    median = {
        side: {key: statistics.median(run[key] for run in runs_) for key in runs_[0]}
        for side, runs_ in results.items()
    }
    result = {
        "ready_started_p50_s": round(median["started"]["ready_s"], 3),
        "ready_forked_p50_s": round(median["forked"]["ready_s"], 3),
        "cpu_started_p50_s": round(median["started"]["cpu_s"], 2),
        "cpu_forked_p50_s": round(median["forked"]["cpu_s"], 2),
        "pss_started_mb": round(median["started"]["pss_mb"]),
        "pss_forked_mb": round(median["forked"]["pss_mb"]),
        "zygote_ready_s": round(zygote_ready_s, 3),
        "zygote_pss_mb": round(zygote_pss),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
