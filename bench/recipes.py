"""Training throughput of each recipe run the way the platform runs it, against the same training
loop run bare in this process; target: platform overhead under 5%.

    .venv/bin/python -m bench.recipes           # 3 runs of each kind per recipe; ~13 minutes
    .venv/bin/python -m bench.recipes --quick   # smoke check on tiny data, 1 run each

platform: `python -m jobs.runner.child <workdir>` as a subprocess with a spec.json written by
`protocol.write_spec`, started as the worker starts it (PYTHONUNBUFFERED=1, OMP_NUM_THREADS=1,
pipes read by one thread per stream into a queue) and its stdout parsed line by line with
`protocol.parse_line` in this process; each line is timestamped when its pump thread reads it,
and a checkpoint file is deleted once its @@checkpoint line arrives (the worker uploads it, then
removes it). Two checkpoint intervals: 60 s, the production setting (JOB_CHECKPOINT_EVERY_S),
which a run this short never reaches, and 2 s, to show what checkpoints cost.

bare: the same recipe class's `train(ctx)` called in this process, with a RecipeContext whose
emit only appends (timestamp, line) to a list and whose checkpoint_every_s is infinite; the
same data, parameters and seed, and the torch settings the child applies (torch.manual_seed of
the seed, deterministic algorithms on the CPU, one thread). "own proc" is that same bare call
made in a fresh interpreter (this script with --bare-process), which separates what the runner
and its pipe cost from what running in a long-lived process that has done other work changes.

Throughput, both sides alike: rows processed between the first @@progress line (step 1) and the
last (the final step) over the time between the two lines, so process start-up, imports, data
loading and the first step are left out. Rows at a step come from the step, the batch size and
the training rows the recipe logs ("Training on N rows"), so an epoch's short last batch counts
what it holds; the span includes the validation pass at each epoch's end. Units: rows/s (tabular,
text; text also tokens/s = rows/s x the dataset's mean tokens per row, capped at max_length),
images/s, windows/s. overhead_pct = (bare rate / platform rate - 1) x 100 from the medians: the
extra time per row. Start-up is reported apart: spawn to the first @@progress line (platform),
train() call to its first @@progress line (bare: data loading and the first step only).

The machine is shared, so beside the wall clock the script reports the same rows per CPU-second
of the training process (user + system time between the same two lines: from /proc for the
child, os.times() for this process, read as each progress line arrives), which other load
moves far less, and the median of the per-round ratios (each round runs the kinds back to back).

On CUDA it also samples `nvidia-smi --query-gpu=utilization.gpu` every 0.5 s during each platform
run and reports the mean over the samples between the first and last @@progress lines.

The table goes to stdout, ending with one `RESULT {json}` line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
THREADS = 1
SEED = 1
PRODUCTION_CHECKPOINT_EVERY_S = 60.0
SHORT_CHECKPOINT_EVERY_S = 2.0
TARGET_OVERHEAD_PCT = 5.0
GPU_SAMPLE_EVERY_S = 0.5
CHILD_TIMEOUT_S = 600
# The recipes log "Training on 16000 rows" (or images, or windows) once the data is encoded.
TRAINING_ROWS = re.compile(r"\bon (\d+) (?:rows|images|windows)\b")
# The text recipe's tokenizer: lowercase words and punctuation (jobs.recipes.text).
TEXT_TOKEN = re.compile(r"\w+|[^\w\s]")
PROGRESS_PREFIX = "@@progress "
# bare: in this process; bare_process: the same in a fresh process of its own; platform: the
# child at the production checkpoint interval; checkpointing: the child checkpointing every 2 s.
KINDS = ["bare", "bare_process", "platform", "checkpointing"]


@dataclass(frozen=True)
class Case:
    recipe: str
    unit: str
    filename: str
    dataset_format: str
    write: Callable[[Path], None]
    parameters: dict[str, Any]


def cases(*, quick: bool) -> list[Case]:
    """Each recipe's data and parameters, sized for about 5 to 15 s of training at one thread
    (a few seconds with --quick); early stopping off, so every run does the same work."""
    from jobs.samples import (
        write_image_sample,
        write_tabular_sample,
        write_text_sample,
        write_timeseries_sample,
    )

    # (rows, images per class or points; epochs) per recipe.
    sizes = (
        [(2_000, 3), (40, 2), (1_000, 2), (960, 2)]
        if quick
        else [(20_000, 50), (600, 5), (20_000, 45), (20_000, 60)]
    )
    (tabular_rows, tabular_epochs), (per_class, image_epochs) = sizes[0], sizes[1]
    (text_rows, text_epochs), (points, series_epochs) = sizes[2], sizes[3]
    return [
        Case(
            "tabular-classifier",
            "rows/s",
            "customers.csv",
            "csv",
            lambda path: write_tabular_sample(path, rows=tabular_rows, seed=SEED),
            {"target": "label", "epochs": tabular_epochs, "early_stopping_patience": 0},
        ),
        Case(
            "image-classifier",
            "images/s",
            "shapes.zip",
            "image_folder_zip",
            lambda path: write_image_sample(path, per_class=per_class, size=32, seed=SEED),
            {"epochs": image_epochs, "early_stopping_patience": 0},
        ),
        Case(
            "text-classifier",
            "rows/s",
            "reviews.csv",
            "csv",
            lambda path: write_text_sample(path, rows=text_rows, seed=SEED),
            {
                "text_column": "text",
                "target": "label",
                "epochs": text_epochs,
                "early_stopping_patience": 0,
            },
        ),
        Case(
            "timeseries-forecaster",
            "windows/s",
            "load.csv",
            "csv",
            lambda path: write_timeseries_sample(path, points=points, seed=SEED),
            {"epochs": series_epochs, "early_stopping_patience": 0},
        ),
    ]


@dataclass
class Run:
    """One training run, from the lines it emitted with the moment each arrived (perf_counter
    seconds from the start: spawn, or the train() call)."""

    lines: list[tuple[float, str]]
    batch_size: int
    epochs: int
    whole_s: float
    load: float
    # (user, system) CPU seconds of the training process when each @@progress line was seen.
    cpu: list[tuple[float, float]] = field(default_factory=list)
    checkpoints: int = 0
    gpu_samples: list[tuple[float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from jobs.runner.protocol import parse_line

        self.progress: list[tuple[float, dict]] = []
        self.val_loss: float | None = None
        self.training_rows: int | None = None
        for at, line in self.lines:
            kind, payload = parse_line(line)
            if kind == "progress":
                self.progress.append((at, payload))
            elif kind == "metric" and payload["name"] == "loss" and payload["split"] == "val":
                self.val_loss = payload["value"]
            elif (
                kind == "log"
                and self.training_rows is None
                and (match := TRAINING_ROWS.search(payload))
            ):
                self.training_rows = int(match.group(1))
        if len(self.progress) < 2:
            raise SystemExit(f"a run printed {len(self.progress)} @@progress lines; need two")
        if self.training_rows is None:
            raise SystemExit("no 'Training on N rows' line: the recipe's log changed")
        if len(self.cpu) != len(self.progress):
            raise SystemExit("a @@progress line without its CPU time")

    def rows_at(self, step: int, total: int) -> int:
        batches = total // self.epochs
        epochs_done, batch = divmod(step, batches)
        return epochs_done * self.training_rows + min(batch * self.batch_size, self.training_rows)

    @property
    def span_s(self) -> float:
        return self.progress[-1][0] - self.progress[0][0]

    @property
    def rows(self) -> int:
        (_, first), (_, last) = self.progress[0], self.progress[-1]
        return self.rows_at(last["step"], last["total"]) - self.rows_at(
            first["step"], first["total"]
        )

    @property
    def rate(self) -> float:
        return self.rows / self.span_s

    @property
    def cpu_s(self) -> tuple[float, float]:
        """(user, system) CPU seconds between the first and the last @@progress line."""
        (user_first, system_first), (user_last, system_last) = self.cpu[0], self.cpu[-1]
        return user_last - user_first, system_last - system_first

    @property
    def cpu_rate(self) -> float:
        """Rows per CPU-second of the training process: what it did, whatever else ran."""
        return self.rows / sum(self.cpu_s)

    @property
    def system_share(self) -> float:
        user, system = self.cpu_s
        return system / (user + system)

    @property
    def startup_s(self) -> float:
        return self.progress[0][0]

    @property
    def gpu_utilization(self) -> float | None:
        first, last = self.progress[0][0], self.progress[-1][0]
        inside = [value for at, value in self.gpu_samples if first <= at <= last]
        values = inside or [value for _, value in self.gpu_samples]
        return statistics.fmean(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind per recipe")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 run each")
    parser.add_argument("--recipe", action="append", help="only this recipe (repeatable)")
    # Internal: the "bare, own process" kind runs this script again with it.
    parser.add_argument("--bare-process", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    cuda = _set_up_torch()
    if args.bare_process:
        recipe, dataset, workdir = args.bare_process
        case = next(case for case in cases(quick=args.quick) if case.recipe == recipe)
        run = train_bare(case, Path(dataset), Path(workdir))
        print(json.dumps({"lines": run.lines, "cpu": run.cpu, "whole_s": run.whole_s}))
        return
    selected = [
        case for case in cases(quick=args.quick) if not args.recipe or case.recipe in args.recipe
    ]
    if not selected:
        parser.error("--recipe names no recipe")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp_name:
        tmp = Path(tmp_name)
        datasets = {}
        for case in selected:
            datasets[case.recipe] = tmp / case.filename
            case.write(datasets[case.recipe])
        results: dict[str, dict[str, list[Run]]] = {
            case.recipe: {kind: [] for kind in KINDS} for case in selected
        }
        for number in range(args.runs):
            for case in selected:
                # The order turns each round, so a slow spell of the shared machine does not
                # always fall on the same kind.
                turn = number % len(KINDS)
                for kind in KINDS[turn:] + KINDS[:turn]:
                    workdir = tmp / f"run-{case.recipe}-{kind}-{number}"
                    workdir.mkdir()
                    dataset = datasets[case.recipe]
                    if kind == "bare":
                        run = train_bare(case, dataset, workdir)
                    elif kind == "bare_process":
                        run = train_bare_in_own_process(case, dataset, workdir, quick=args.quick)
                    else:
                        every = (
                            PRODUCTION_CHECKPOINT_EVERY_S
                            if kind == "platform"
                            else SHORT_CHECKPOINT_EVERY_S
                        )
                        run = train_on_platform(case, dataset, workdir, every, gpu=cuda)
                    shutil.rmtree(workdir)
                    results[case.recipe][kind].append(run)
                    progress(
                        f"run {number + 1}/{args.runs} {case.recipe} {kind}: "
                        f"{run.rate:,.1f} {case.unit} over {run.span_s:.2f} s, start-up "
                        f"{run.startup_s:.2f} s, {run.checkpoints} checkpoints, load {run.load:.2f}"
                    )
        tokens_per_row = {
            case.recipe: mean_tokens_per_row(datasets[case.recipe], case.parameters)
            for case in selected
            if case.recipe == "text-classifier"
        }
    report(
        selected,
        results,
        tokens_per_row=tokens_per_row,
        cuda=cuda,
        device=_device_name(cuda),
        loads=(load_before, os.getloadavg()),
        quick=args.quick,
    )


def _set_up_torch() -> bool:
    """Train in this process as the child does: one thread, deterministic algorithms on the
    CPU. True when CUDA is available."""
    # Before torch is imported, so that its thread pool has one thread.
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    import torch

    torch.set_num_threads(THREADS)
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.use_deterministic_algorithms(True)  # as jobs.runner.child does on the CPU
    return cuda


def _device_name(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name(0) if cuda else "cpu"


def train_bare_in_own_process(case: Case, dataset: Path, workdir: Path, *, quick: bool) -> Run:
    """train_bare in a fresh interpreter (this script with --bare-process), which imports torch
    and the recipe as the child does, without the runner, the spec or the pipe protocol."""
    from jobs.recipes.base import validate_parameters
    from jobs.recipes.catalog import get_recipe

    parameters = validate_parameters(get_recipe(case.recipe), case.parameters)
    command = [sys.executable, "-m", "bench.recipes", "--bare-process"]
    command += [case.recipe, str(dataset), str(workdir)] + (["--quick"] if quick else [])
    load = os.getloadavg()[0]
    finished = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": str(THREADS)},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if finished.returncode != 0:
        raise SystemExit(f"{case.recipe}: the bare process failed:\n{finished.stderr[-2000:]}")
    measured = json.loads(finished.stdout.splitlines()[-1])
    return Run(
        lines=[(at, line) for at, line in measured["lines"]],
        batch_size=parameters["batch_size"],
        epochs=parameters["epochs"],
        whole_s=measured["whole_s"],
        load=load,
        cpu=[(user, system) for user, system in measured["cpu"]],
    )


def train_bare(case: Case, dataset: Path, workdir: Path) -> Run:
    import torch

    from jobs.recipes.base import RecipeContext, validate_parameters
    from jobs.recipes.catalog import get_recipe

    recipe_cls = get_recipe(case.recipe)
    parameters = validate_parameters(recipe_cls, case.parameters)
    lines: list[tuple[float, str]] = []
    cpu: list[tuple[float, float]] = []

    def emit(line: str) -> None:
        lines.append((time.perf_counter(), line))
        if line.startswith(PROGRESS_PREFIX):
            times = os.times()  # this process's; nothing else runs in it during train()
            cpu.append((times.user, times.system))

    load = os.getloadavg()[0]
    torch.manual_seed(SEED)
    ctx = RecipeContext(
        workdir=workdir,
        dataset_path=dataset,
        dataset_format=case.dataset_format,
        parameters=parameters,
        seed=SEED,
        output_dir=workdir / "output",
        checkpoint_dir=workdir / "checkpoints",
        checkpoint_every_s=math.inf,
        emit=emit,
    )
    started = time.perf_counter()
    result = recipe_cls().train(ctx)
    whole = time.perf_counter() - started
    if result is None:
        raise SystemExit(f"{case.recipe}: the bare run stopped without a result")
    return Run(
        lines=[(at - started, line) for at, line in lines],
        batch_size=parameters["batch_size"],
        epochs=parameters["epochs"],
        whole_s=whole,
        load=load,
        cpu=cpu,
    )


def train_on_platform(
    case: Case, dataset: Path, workdir: Path, checkpoint_every_s: float, *, gpu: bool
) -> Run:
    from jobs.recipes.base import validate_parameters
    from jobs.recipes.catalog import get_recipe
    from jobs.runner.protocol import EXIT_OK, parse_line, write_spec

    parameters = validate_parameters(get_recipe(case.recipe), case.parameters)
    for folder in ("output", "checkpoints"):
        (workdir / folder).mkdir()
    write_spec(
        workdir,
        {
            "task": "train",
            "recipe": case.recipe,
            "parameters": case.parameters,
            "dataset": {"path": str(dataset), "format": case.dataset_format},
            "model_dir": None,
            "resume_from": None,
            "output_dir": "output",
            "checkpoint_dir": "checkpoints",
            "checkpoint_every_s": checkpoint_every_s,
            "seed": SEED,
            "max_runtime_s": None,
            "processes": 1,
        },
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(THREADS)}
    arrived: queue.Queue[tuple[float, str, str] | None] = queue.Queue()
    load = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "jobs.runner.child", str(workdir)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )

    cpu: list[tuple[float, float]] = []

    def pump(stream: str, pipe: Any) -> None:
        for line in pipe:
            at = time.perf_counter() - started
            if stream == "stdout" and line.startswith(PROGRESS_PREFIX):
                cpu.append(process_cpu_s(child.pid))
            arrived.put((at, stream, line.rstrip("\n")))
        arrived.put(None)

    for stream, pipe in (("stdout", child.stdout), ("stderr", child.stderr)):
        threading.Thread(target=pump, args=(stream, pipe), daemon=True).start()
    sampler = GpuSampler(started) if gpu else None
    lines: list[tuple[float, str]] = []
    stderr: list[str] = []
    checkpoints = 0
    open_pipes = 2
    deadline = started + CHILD_TIMEOUT_S
    while open_pipes:
        try:
            item = arrived.get(timeout=0.1)
        except queue.Empty:
            if time.perf_counter() > deadline:
                child.kill()
                raise SystemExit(f"{case.recipe}: the child ran past {CHILD_TIMEOUT_S} s") from None
            continue
        if item is None:
            open_pipes -= 1
            continue
        at, stream, line = item
        if stream == "stderr":
            stderr.append(line)
            continue
        lines.append((at, line))
        kind, payload = parse_line(line)
        if kind == "checkpoint":
            checkpoints += 1
            (workdir / payload["path"]).unlink()
    code = child.wait()
    whole = time.perf_counter() - started
    samples = sampler.stop() if sampler else []
    if code != EXIT_OK:
        tail = "\n".join(stderr[-20:])
        raise SystemExit(f"{case.recipe}: the child exited with {code}:\n{tail}")
    return Run(
        lines=lines,
        batch_size=parameters["batch_size"],
        epochs=parameters["epochs"],
        whole_s=whole,
        load=load,
        cpu=cpu,
        checkpoints=checkpoints,
        gpu_samples=samples,
    )


def process_cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process `pid` so far, all its threads, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # Fields after the command name, which is in parentheses: state is field 3, utime 14.
    fields = stat.rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


class GpuSampler:
    """nvidia-smi's utilization.gpu (%, the first GPU) every GPU_SAMPLE_EVERY_S seconds."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        command = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu",
            "--format=csv,noheader,nounits",
            "--id=0",
        ]
        while not self.done.wait(GPU_SAMPLE_EVERY_S):
            try:
                output = subprocess.run(
                    command, capture_output=True, text=True, timeout=5, check=True
                ).stdout
                value = float(output.split()[0])
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                continue
            self.samples.append((time.perf_counter() - self.started, value))

    def stop(self) -> list[tuple[float, float]]:
        self.done.set()
        self.thread.join()
        return self.samples


def mean_tokens_per_row(dataset: Path, parameters: dict[str, Any]) -> float:
    """Tokens the text recipe reads per row of `dataset` (all rows), at most max_length each."""
    import csv

    from jobs.recipes.base import validate_parameters
    from jobs.recipes.catalog import get_recipe

    resolved = validate_parameters(get_recipe("text-classifier"), parameters)
    with dataset.open(newline="", encoding="utf-8") as handle:
        counts = [
            min(
                len(TEXT_TOKEN.findall(row[resolved["text_column"]].lower())),
                resolved["max_length"],
            )
            for row in csv.DictReader(handle)
        ]
    return statistics.fmean(counts)


def report(
    selected: list[Case],
    results: dict[str, dict[str, list[Run]]],
    *,
    tokens_per_row: dict[str, float],
    cuda: bool,
    device: str,
    loads: tuple[tuple[float, ...], tuple[float, ...]],
    quick: bool,
) -> None:
    med = statistics.median
    runs = len(results[selected[0].recipe]["bare"])
    print(
        f"Recipe training throughput, platform vs bare: device {device}, OMP_NUM_THREADS="
        f"{THREADS}, seed {SEED}, {runs} run(s) of each kind per recipe, interleaved; load "
        f"average {loads[0][0]:.2f} before, {loads[1][0]:.2f} after"
    )
    print(
        "platform = `python -m jobs.runner.child <workdir>` (spec.json, stdout parsed here with "
        f"protocol.parse_line), checkpoint_every_s {PRODUCTION_CHECKPOINT_EVERY_S:g} (production; "
        f"'ckpt {SHORT_CHECKPOINT_EVERY_S:g} s': every {SHORT_CHECKPOINT_EVERY_S:g} s); bare = "
        "recipe.train(ctx) in this process, no-op emit, no checkpoints; own proc = the same bare "
        "call in a fresh interpreter"
    )
    print(
        "rate = rows between the first and the last @@progress line / time between them "
        "(start-up, data loading and step 1 excluded); medians; overhead = bare / platform - 1"
    )
    print()
    header = (
        f"{'recipe':24}{'unit':>10}{'bare':>11}{'own proc':>11}{'platform':>11}{'overhead':>10}"
        f"{'vs own':>9}{'ckpt 2 s':>11}{'overhead':>10}{'ckpts':>7}{'start-up s':>12}"
    )
    print(header)
    print("-" * len(header))
    result: dict[str, dict[str, Any]] = {}
    for case in selected:
        kinds = results[case.recipe]
        rate = {kind: med(run.rate for run in kinds[kind]) for kind in KINDS}
        bare, platform = rate["bare"], rate["platform"]
        overhead = (bare / platform - 1) * 100
        own_overhead = (rate["bare_process"] / platform - 1) * 100
        checkpoint_overhead = (bare / rate["checkpointing"] - 1) * 100
        checkpoints = med(run.checkpoints for run in kinds["checkpointing"])
        startup = med(run.startup_s for run in kinds["platform"])
        print(
            f"{case.recipe:24}{case.unit:>10}{bare:11,.1f}{rate['bare_process']:11,.1f}"
            f"{platform:11,.1f}{overhead:+9.1f}%{own_overhead:+8.1f}%"
            f"{rate['checkpointing']:11,.1f}{checkpoint_overhead:+9.1f}%{checkpoints:7g}"
            f"{startup:12.2f}"
        )
        result[case.recipe] = {
            "platform": round(platform, 1),
            "bare": round(bare, 1),
            "overhead_pct": round(overhead, 2),
            "unit": case.unit,
            "overhead_paired_pct": round((_paired(kinds, "platform", "rate") - 1) * 100, 2),
            "overhead_cpu_pct": round((_ratio(kinds, "platform", "cpu_rate") - 1) * 100, 2),
            "bare_own_process": round(rate["bare_process"], 1),
            "overhead_vs_own_process_pct": round(own_overhead, 2),
            "platform_checkpoint_2s": round(rate["checkpointing"], 1),
            "overhead_checkpoint_2s_pct": round(checkpoint_overhead, 2),
            "startup_s": round(startup, 2),
        }
        if case.recipe in tokens_per_row:
            per_row = tokens_per_row[case.recipe]
            print(
                f"{'':24}{'tokens/s':>10}{bare * per_row:11,.0f}"
                f"{rate['bare_process'] * per_row:11,.0f}{platform * per_row:11,.0f}"
                f"{'':19}{rate['checkpointing'] * per_row:11,.0f}   ({per_row:.2f} tokens per row)"
            )
            result[case.recipe]["tokens_per_s"] = {
                "platform": round(platform * per_row),
                "bare": round(bare * per_row),
            }
        if cuda:
            utilization = [run.gpu_utilization for run in kinds["platform"]]
            known = [value for value in utilization if value is not None]
            mean = f"{statistics.fmean(known):.1f}%" if known else "no samples"
            print(f"{'':24}GPU utilization during the platform runs (mean): {mean}")
            result[case.recipe]["gpu_utilization_pct"] = (
                round(statistics.fmean(known), 1) if known else None
            )
    print()
    if not cuda:
        print("GPU utilization: not available (no CUDA device; trained on the CPU)")
    print(
        "start-up s = spawn -> first @@progress line of the platform runs (checkpoint 60 s): "
        "interpreter, imports, spec, data loading and step 1"
    )
    print(f"{'':24}{'bare (this process)':>24}{'own proc':>10}{'platform':>10}")
    for case in selected:
        kinds = results[case.recipe]
        starts = [med(run.startup_s for run in kinds[kind]) for kind in KINDS[:3]]
        print(
            f"  {case.recipe:22}{starts[0]:24.2f}{starts[1]:10.2f}{starts[2]:10.2f}"
            "   s from train() call (bare, own proc) or spawn (platform) to step 1"
        )
    print()
    print(
        "Per CPU-second of the training process (user + system time between the same two "
        "lines; other load on the machine moves it far less than the wall clock):"
    )
    header = (
        f"{'recipe':24}{'unit/CPU-s':>12}{'bare':>11}{'own proc':>11}{'platform':>11}"
        f"{'overhead':>10}{'vs own':>9}{'ckpt 2 s':>11}{'sys % bare/own/platform':>26}"
    )
    print(header)
    print("-" * len(header))
    for case in selected:
        kinds = results[case.recipe]
        cpu = {kind: med(run.cpu_rate for run in kinds[kind]) for kind in KINDS}
        system = "/".join(
            f"{med(run.system_share for run in kinds[kind]) * 100:.1f}" for kind in KINDS[:3]
        )
        print(
            f"{case.recipe:24}{case.unit.split('/')[0]:>12}{cpu['bare']:11,.1f}"
            f"{cpu['bare_process']:11,.1f}{cpu['platform']:11,.1f}"
            f"{(cpu['bare'] / cpu['platform'] - 1) * 100:+9.1f}%"
            f"{(cpu['bare_process'] / cpu['platform'] - 1) * 100:+8.1f}%"
            f"{cpu['checkpointing']:11,.1f}{system:>26}"
        )
    print()
    print(
        "Each run: wall rate (span s, load average at its start) | per CPU-second; then "
        "bare / platform and own proc / platform per round"
    )
    labels = {
        "bare": "bare",
        "bare_process": "own proc",
        "platform": f"platform {PRODUCTION_CHECKPOINT_EVERY_S:g} s",
        "checkpointing": f"platform {SHORT_CHECKPOINT_EVERY_S:g} s",
    }
    for case in selected:
        kinds = results[case.recipe]
        for kind in KINDS:
            cells = "  ".join(
                f"{run.rate:,.1f} ({run.span_s:.2f} s, {run.load:.1f})" for run in kinds[kind]
            )
            cpu = "  ".join(f"{run.cpu_rate:,.1f}" for run in kinds[kind])
            print(f"  {case.recipe:24}{labels[kind]:14}{cells}  |  CPU: {cpu}")
        for numerator, kind, label in (
            ("bare", "platform", "bare/60 s"),
            ("bare_process", "platform", "own/60 s"),
            ("bare", "checkpointing", "bare/2 s"),
        ):
            ratios = _round_ratios(kinds, kind, "rate", numerator)
            cpu_ratios = _round_ratios(kinds, kind, "cpu_rate", numerator)
            print(
                f"  {'':24}{label:14}"
                + "  ".join(f"{ratio:.3f}" for ratio in ratios)
                + f" (median {med(ratios):.3f})  |  CPU: "
                + "  ".join(f"{ratio:.3f}" for ratio in cpu_ratios)
                + f" (median {med(cpu_ratios):.3f})"
            )
        losses = {kind: {run.val_loss for run in runs} for kind, runs in kinds.items()}
        same = len(set.union(*losses.values())) == 1
        print(
            f"  {'':24}{'val loss':14}"
            + ("the same in every run (the same computation)" if same else f"DIFFERS: {losses}")
        )
    print()
    for key, label in (
        ("overhead_pct", "medians of the wall-clock rates, vs bare"),
        ("overhead_paired_pct", "median of the rounds' wall-clock ratios, vs bare"),
        ("overhead_cpu_pct", "medians of the per-CPU-second rates, vs bare"),
        ("overhead_vs_own_process_pct", "medians of the wall-clock rates, vs own proc"),
    ):
        worst = max(entry[key] for entry in result.values())
        verdict = "met" if worst < TARGET_OVERHEAD_PCT else "MISSED"
        print(
            f"target overhead < {TARGET_OVERHEAD_PCT:g}% at checkpoint_every_s "
            f"{PRODUCTION_CHECKPOINT_EVERY_S:g}, {label}: {verdict}; largest {worst:+.1f}%"
        )
    if quick:
        print("--quick: spans of milliseconds; these figures check the script, not the platform")
    print(f"RESULT {json.dumps(result)}")


def _ratio(kinds: dict[str, list[Run]], kind: str, measure: str) -> float:
    """Median bare rate / median `kind` rate, `measure` being "rate" or "cpu_rate"."""
    bare = statistics.median(getattr(run, measure) for run in kinds["bare"])
    return bare / statistics.median(getattr(run, measure) for run in kinds[kind])


def _round_ratios(
    kinds: dict[str, list[Run]], kind: str, measure: str, numerator: str = "bare"
) -> list[float]:
    """`numerator` / `kind` for each round (the runs that ran back to back)."""
    pairs = zip(kinds[numerator], kinds[kind], strict=True)
    return [getattr(first, measure) / getattr(other, measure) for first, other in pairs]


def _paired(kinds: dict[str, list[Run]], kind: str, measure: str) -> float:
    return statistics.median(_round_ratios(kinds, kind, measure))


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
