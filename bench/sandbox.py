"""What the bubblewrap sandbox (jobs/runner/sandbox.py) costs a torch child: start-up to its first
training step, and training throughput, sandboxed against the same child run plainly. Targets:
start-up adds under 150 ms; throughput within 2%.

    .venv/bin/python -m bench.sandbox            # 9 rounds; about 2 minutes
    .venv/bin/python -m bench.sandbox --quick    # 2 rounds, shorter loops: a smoke check

The child (CHILD below) imports torch, builds a small MLP (64-256-256-10, batch 256, SGD, one
thread), runs one training step and prints `first-step`, then trains for a fixed number of steps
and prints its steps per second, timed by its own clock after a warm-up, so start-up is not in
it. It also reports steps per CPU-second of its own (user + system time over the same loop),
which other load on a shared machine moves far less than the wall clock.

sandboxed: `sandbox_start` with the limits a job would get (4 GB address space, 512 tasks, 1024
open files, a 10 GB work folder), so the watchdog's polling of /proc and of the work folder is
counted; plain: `subprocess.Popen` of the same interpreter on the same script, with the same
environment and working folder, no sandbox. Start-up: from just before the start call to the
moment this process reads `first-step` (interpreter start, the torch import, the model, one
step; the sandbox adds bubblewrap's namespaces and mounts and the prlimit exec). The rounds
interleave the two, alternating which goes first, and the figures are medians over rounds.
`startup_added_ms` = median sandboxed - median plain; `throughput_overhead_pct` = (plain rate /
sandboxed rate - 1) x 100, the extra time per step.

Beside them: the start-up of `/usr/bin/true` through the sandbox against a plain spawn (20
rounds), the sandbox's own cost without torch's import noise.

Where this process runs as root the sandbox runs as SANDBOX_UID; an interpreter that user cannot
read (a pyenv under /root) is replaced, on both sides, by the system's Python of the same version
with this environment's site-packages on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from jobs.runner.sandbox import (
    MB,
    Limits,
    SandboxSpec,
    python_runtime,
    read_lines,
    runtime_refusal,
    sandbox_start,
    sandbox_unavailable_reason,
)

TARGET_STARTUP_MS = 150.0
TARGET_OVERHEAD_PCT = 2.0
CHILD = r"""
import json, sys, time

import torch

steps = int(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 256), torch.nn.ReLU(),
    torch.nn.Linear(256, 10),
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
inputs, targets = torch.randn(256, 64), torch.randint(0, 10, (256,))


def step():
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()


step()
print("first-step", flush=True)
for _ in range(20):
    step()
began, cpu_began = time.perf_counter(), time.process_time()
for _ in range(steps):
    step()
wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
print(json.dumps({"steps_per_s": steps / wall, "steps_per_cpu_s": steps / cpu}), flush=True)
"""


def _runtime():
    runtime = python_runtime(sys.executable)
    if runtime_refusal(runtime) is None:
        return runtime, None
    system = "/usr/bin/python3"
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    return python_runtime(system, site_packages=[site]), runtime_refusal(runtime)


def _environment(runtime, work: Path) -> dict[str, str]:
    """The child's environment on both sides: the sandbox's own, with the folder's real path for
    the plain child."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        **runtime.environment,
    }


def _fresh(root: Path, name: str) -> Path:
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(mode=0o700)
    return folder


def run_sandboxed(runtime, code: Path, work: Path, command: list[str]) -> tuple[float, list[str]]:
    spec = SandboxSpec(
        command=tuple(command),
        work_folder=work,
        read_only={**runtime.read_only, "/code": code},
        environment={**runtime.environment, "OMP_NUM_THREADS": "1"},
        limits=Limits(wall_clock_s=600, memory_bytes=4096 * MB, processes=512),
    )
    began = time.perf_counter()
    process = sandbox_start(spec)
    return _read(process, began)


def run_plain(runtime, code: Path, work: Path, command: list[str]) -> tuple[float, list[str]]:
    command = [part.replace("/code/", f"{code}/") for part in command]
    began = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=work,
        env=_environment(runtime, work),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    return _read(process, began)


def _read(process, began: float) -> tuple[float, list[str]]:
    """(seconds from `began` to the first line, every stdout line)."""
    first = None
    lines = []
    for line in read_lines(process.stdout):
        if first is None:
            first = time.perf_counter() - began
        lines.append(line)
    errors = process.stderr.read()
    code = process.wait()
    process.stdout.close()
    process.stderr.close()
    if code != 0:
        raise RuntimeError(f"the child failed with exit code {code}: {errors[-2000:]}")
    return (first if first is not None else time.perf_counter() - began), lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, steps, true_rounds = (2, 200, 5) if args.quick else (args.rounds, args.steps, 20)

    reason = sandbox_unavailable_reason()
    if reason is not None:
        sys.exit(reason)
    runtime, replaced = _runtime()
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="bench-sandbox-", dir="/tmp"))
    root.chmod(0o711)
    code = root / "code"
    code.mkdir()
    code.chmod(0o755)
    (code / "child.py").write_text(CHILD)
    (code / "child.py").chmod(0o644)
    sides = {"sandboxed": run_sandboxed, "plain": run_plain}
    startup: dict[str, list[float]] = {side: [] for side in sides}
    rate: dict[str, list[float]] = {side: [] for side in sides}
    cpu_rate: dict[str, list[float]] = {side: [] for side in sides}
    bare: dict[str, list[float]] = {side: [] for side in sides}
    try:
        for index in range(true_rounds):
            order = list(sides) if index % 2 == 0 else list(reversed(sides))
            for side in order:
                took, _ = sides[side](runtime, code, _fresh(root, side), ["/usr/bin/true"])
                bare[side].append(took)
        for index in range(rounds):
            order = list(sides) if index % 2 == 0 else list(reversed(sides))
            for side in order:
                command = [runtime.interpreter, "/code/child.py", str(steps)]
                took, lines = sides[side](runtime, code, _fresh(root, side), command)
                assert lines[0] == "first-step", lines
                startup[side].append(took)
                measured = json.loads(lines[-1])
                rate[side].append(measured["steps_per_s"])
                cpu_rate[side].append(measured["steps_per_cpu_s"])
                print(
                    f"round {index + 1}/{rounds} {side:>9}: start-up {took * 1000:7.1f} ms, "
                    f"{rate[side][-1]:7.1f} steps/s",
                    file=sys.stderr,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    def median_ms(values: list[float]) -> float:
        return statistics.median(values) * 1000

    added_ms = median_ms(startup["sandboxed"]) - median_ms(startup["plain"])
    overhead = (statistics.median(rate["plain"]) / statistics.median(rate["sandboxed"]) - 1) * 100
    bare_added_ms = median_ms(bare["sandboxed"]) - median_ms(bare["plain"])
    # Each round's two runs ran back to back: their ratio cancels load that drifts over minutes.
    paired = statistics.median(
        (plain / sandboxed - 1) * 100
        for plain, sandboxed in zip(rate["plain"], rate["sandboxed"], strict=True)
    )
    cpu_overhead = (
        statistics.median(cpu_rate["plain"]) / statistics.median(cpu_rate["sandboxed"]) - 1
    ) * 100
    print(
        f"Sandbox cost for a torch child (MLP 64-256-256-10, batch 256, 1 thread): "
        f"{rounds} interleaved rounds, {steps} timed steps each"
    )
    print(
        f"  machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Linux {platform.release()}; load average before {load_before[0]:.2f}, "
        f"after {load_after[0]:.2f}"
    )
    print(f"  interpreter: {runtime.interpreter} (Python {platform.python_version()} here)")
    if replaced:
        print(f"  (this interpreter's own installation was refused: {replaced})")
    print()
    print(f"  {'':34}{'sandboxed':>12}{'plain':>12}{'added':>12}")
    print(
        f"  {'start-up to the first step, ms':34}{median_ms(startup['sandboxed']):12.1f}"
        f"{median_ms(startup['plain']):12.1f}{added_ms:12.1f}"
    )
    print(
        f"  {'training, steps/s':34}{statistics.median(rate['sandboxed']):12.1f}"
        f"{statistics.median(rate['plain']):12.1f}{overhead:11.2f}%"
    )
    print(f"  {'training, median of per-round ratios':34}{'':24}{paired:11.2f}%")
    print(
        f"  {'training, steps per CPU-second':34}{statistics.median(cpu_rate['sandboxed']):12.1f}"
        f"{statistics.median(cpu_rate['plain']):12.1f}{cpu_overhead:11.2f}%"
    )
    print(
        f"  {'/usr/bin/true start to exit, ms':34}{median_ms(bare['sandboxed']):12.1f}"
        f"{median_ms(bare['plain']):12.1f}{bare_added_ms:12.1f}"
    )
    print()
    for side in sides:
        print(
            f"  {side} start-up ms, each round: "
            + ", ".join(f"{value * 1000:.0f}" for value in startup[side])
        )
        print(f"  {side} steps/s, each round: " + ", ".join(f"{value:.1f}" for value in rate[side]))
    met_startup = "met" if added_ms < TARGET_STARTUP_MS else "NOT met"
    met_overhead = "met" if overhead < TARGET_OVERHEAD_PCT else "NOT met"
    print(f"  target start-up added < {TARGET_STARTUP_MS:g} ms: {met_startup}")
    print(f"  target throughput overhead < {TARGET_OVERHEAD_PCT:g}%: {met_overhead}")
    result = {"startup_added_ms": round(added_ms, 1), "throughput_overhead_pct": round(overhead, 2)}
    print(f"RESULT {json.dumps(result)}")


if __name__ == "__main__":
    main()
