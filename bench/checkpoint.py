"""How long a recipe's training loop is blocked per checkpoint, against a plain `torch.save` of
the same state to the same disk.

    .venv/bin/python -m bench.checkpoint           # 20 checkpoints per recipe; about a minute
    .venv/bin/python -m bench.checkpoint --quick   # smoke check, 5 checkpoints each

Each recipe trains for real in this process (one thread, as a CPU slot's child does) with
checkpoint_every_s 0, so the loop checkpoints after every step through the recipe's own code
path; `ctx.checkpoint_due` and `ctx.save_checkpoint` are wrapped on the context to time them.
blocked = from the moment `checkpoint_due()` returned True to the return of `save_checkpoint`:
the recipe gathering its state, then the context checking it, writing it to a temporary file,
renaming it and emitting the @@checkpoint line (written and flushed to /dev/null, as the child
writes it to its stdout pipe). The baseline, beside each checkpoint, is
`torch.save(state, path)` of the same state dictionary into the same directory, timed alone;
and, to show where a difference comes from, the same torch.save to a temporary name followed
by `os.replace` (the context's write-then-rename). They run after the recipe's save for even
checkpoints and before it (in the opposite order) for odd ones, so that none always finds the
tensors warm in the CPU caches. The files are deleted once timed (the worker uploads each
checkpoint and removes it), outside the timed spans.

Only checkpoints from the second epoch on are timed: from then on the state holds the best
epoch's weights, as a checkpoint of a real run mostly does, so the datasets are small (a few
steps per epoch). The training stops itself after the timed checkpoints (its stop event is set).
Medians over the checkpoints; ratio = blocked / torch.save. State MB is the size of the file
torch.save wrote (MB = 2^20 bytes).

The table goes to stdout, ending with one `RESULT {json}` line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THREADS = 1
SEED = 1
MB = 2**20


@dataclass(frozen=True)
class Case:
    label: str
    recipe: str
    filename: str
    dataset_format: str
    write: Callable[[Path], None]
    parameters: dict[str, Any]


def cases() -> list[Case]:
    """The recipes at their default model sizes, on small samples (4 or 5 steps per epoch), and
    the tabular classifier with wide layers for a state of tens of MB."""
    from jobs.samples import (
        write_image_sample,
        write_tabular_sample,
        write_text_sample,
        write_timeseries_sample,
    )

    # Enough epochs for the timed checkpoints; the run is stopped once they are taken.
    run = {"epochs": 100, "early_stopping_patience": 0}
    return [
        Case(
            "tabular-classifier",
            "tabular-classifier",
            "customers.csv",
            "csv",
            lambda path: write_tabular_sample(path, rows=400, seed=SEED),
            {"target": "label", **run},
        ),
        Case(
            "image-classifier",
            "image-classifier",
            "shapes.zip",
            "image_folder_zip",
            lambda path: write_image_sample(path, per_class=100, size=32, seed=SEED),
            run,
        ),
        Case(
            "text-classifier",
            "text-classifier",
            "reviews.csv",
            "csv",
            lambda path: write_text_sample(path, rows=400, seed=SEED),
            {"text_column": "text", "target": "label", **run},
        ),
        Case(
            "timeseries-forecaster",
            "timeseries-forecaster",
            "load.csv",
            "csv",
            lambda path: write_timeseries_sample(path, points=24 * 15, seed=SEED),
            run,
        ),
        Case(
            "tabular-classifier [1024, 1024, 1024]",
            "tabular-classifier",
            "customers.csv",
            "csv",
            lambda path: write_tabular_sample(path, rows=400, seed=SEED),
            {"target": "label", "hidden_sizes": [1024, 1024, 1024], **run},
        ),
    ]


@dataclass
class Timings:
    """Seconds per timed checkpoint."""

    blocked: list[float] = field(default_factory=list)
    gather: list[float] = field(default_factory=list)  # checkpoint_due() True -> save called
    save_call: list[float] = field(default_factory=list)  # ctx.save_checkpoint alone
    torch_save: list[float] = field(default_factory=list)
    save_rename: list[float] = field(default_factory=list)  # torch.save to a temporary, rename
    state_bytes: int = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20, help="timed checkpoints per recipe")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 checkpoints each")
    args = parser.parse_args()
    if args.quick:
        args.count = 5
    if args.count < 1:
        parser.error("--count must be at least 1")
    # Before torch is imported: one thread, as a CPU slot's child trains.
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    import torch

    torch.set_num_threads(THREADS)
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.use_deterministic_algorithms(True)  # as jobs.runner.child does on the CPU
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as tmp_name:
        tmp = Path(tmp_name)
        for number, case in enumerate(cases()):
            workdir = tmp / f"case-{number}"
            workdir.mkdir()
            dataset = workdir / case.filename
            case.write(dataset)
            results[case.label] = measure(case, dataset, workdir, count=args.count)
            timings = results[case.label]
            progress(
                f"{case.label}: blocked {statistics.median(timings.blocked) * 1000:.2f} ms, "
                f"torch.save {statistics.median(timings.torch_save) * 1000:.2f} ms"
            )
        disk = _filesystem(tmp)
    report(
        results,
        count=args.count,
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        disk=disk,
        loads=(load_before, os.getloadavg()),
    )


def measure(case: Case, dataset: Path, workdir: Path, *, count: int) -> Timings:
    import torch

    from jobs.recipes.base import RecipeContext, validate_parameters
    from jobs.recipes.catalog import get_recipe
    from jobs.runner.protocol import parse_line

    recipe_cls = get_recipe(case.recipe)
    timings = Timings()
    epochs_done = 0
    with open(os.devnull, "w", encoding="utf-8") as sink:

        def emit(line: str) -> None:
            nonlocal epochs_done
            sink.write(line + "\n")
            sink.flush()
            # Each epoch ends with its train-loss metric (progress lines come at most once a
            # second). Only metric lines are parsed: the @@checkpoint line costs its write alone.
            if line.startswith("@@metric "):
                _, payload = parse_line(line)
                if payload["name"] == "loss" and payload["split"] == "train":
                    epochs_done += 1

        torch.manual_seed(SEED)
        ctx = RecipeContext(
            workdir=workdir,
            dataset_path=dataset,
            dataset_format=case.dataset_format,
            parameters=validate_parameters(recipe_cls, case.parameters),
            seed=SEED,
            output_dir=workdir / "output",
            checkpoint_dir=workdir / "checkpoints",
            checkpoint_every_s=0.0,
            emit=emit,
        )
        checkpoint_due, save_checkpoint = ctx.checkpoint_due, ctx.save_checkpoint
        due_at = 0.0

        def timed_checkpoint_due() -> bool:
            nonlocal due_at
            due = checkpoint_due()
            if due:
                due_at = time.perf_counter()
            return due

        def timed_save_checkpoint(state: dict[str, Any], step: int) -> Path:
            called = time.perf_counter()
            # The checkpoints of the first epoch (no best weights yet) and the one the stop
            # writes are not timed.
            if not epochs_done or len(timings.blocked) >= count:
                path = save_checkpoint(state, step)
                path.unlink()
                return path
            plain = ctx.checkpoint_dir / f"plain-{step:08d}.pt"
            renamed = ctx.checkpoint_dir / f"renamed-{step:08d}.pt"
            baselines_first = len(timings.blocked) % 2 == 1
            if baselines_first:
                rename_s = _timed_save_rename(state, renamed)
                plain_s = _timed_torch_save(state, plain)
            started = time.perf_counter()
            path = save_checkpoint(state, step)
            ended = time.perf_counter()
            if not baselines_first:
                plain_s = _timed_torch_save(state, plain)
                rename_s = _timed_save_rename(state, renamed)
            timings.gather.append(called - due_at)
            timings.save_call.append(ended - started)
            timings.blocked.append((called - due_at) + (ended - started))
            timings.torch_save.append(plain_s)
            timings.save_rename.append(rename_s)
            timings.state_bytes = plain.stat().st_size
            for written in (path, plain, renamed):
                written.unlink()
            if len(timings.blocked) >= count:
                ctx.stop_event.set()
            return path

        ctx.checkpoint_due = timed_checkpoint_due
        ctx.save_checkpoint = timed_save_checkpoint
        result = recipe_cls().train(ctx)
    if result is not None or len(timings.blocked) < count:
        raise SystemExit(
            f"{case.label}: the run ended after {len(timings.blocked)} timed checkpoints; "
            "give it more epochs"
        )
    return timings


def _timed_torch_save(state: dict[str, Any], path: Path) -> float:
    import torch

    started = time.perf_counter()
    torch.save(state, path)
    return time.perf_counter() - started


def _timed_save_rename(state: dict[str, Any], path: Path) -> float:
    import torch

    temporary = path.with_name(f".{path.name}.tmp")
    started = time.perf_counter()
    torch.save(state, temporary)
    os.replace(temporary, path)
    return time.perf_counter() - started


def _filesystem(path: Path) -> str:
    """The device and type of the filesystem holding `path`, from /proc/mounts."""
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return "unknown filesystem"
    best = ("", "unknown", "unknown")
    for line in mounts:
        device, mount_point, kind, *_ = line.split()
        inside = path.resolve().is_relative_to(mount_point)
        if inside and len(mount_point) >= len(best[0]):
            best = (mount_point, device, kind)
    return f"{best[1]} ({best[2]}) mounted at {best[0]}"


def report(
    results: dict[str, Timings],
    *,
    count: int,
    device: str,
    disk: str,
    loads: tuple[tuple[float, ...], tuple[float, ...]],
) -> None:
    med = statistics.median
    print(
        f"Checkpoint cost: time the training loop is blocked per checkpoint vs a plain "
        f"torch.save of the same state; device {device}, OMP_NUM_THREADS={THREADS}; {count} "
        f"checkpoints per recipe (epoch 2 on), medians; disk {disk}; load average "
        f"{loads[0][0]:.2f} before, {loads[1][0]:.2f} after"
    )
    print()
    header = (
        f"{'recipe':40}{'state MB':>10}{'blocked ms':>12}{'p90 ms':>9}{'gather ms':>11}"
        f"{'save ms':>10}{'torch.save ms':>15}{'p90 ms':>9}{'+rename ms':>12}{'ratio':>8}"
    )
    print(header)
    print("-" * len(header))
    result = {}
    for label, timings in results.items():
        blocked, plain = med(timings.blocked), med(timings.torch_save)
        ratio = blocked / plain
        print(
            f"{label:40}{timings.state_bytes / MB:10.3f}{blocked * 1000:12.2f}"
            f"{_p90(timings.blocked) * 1000:9.2f}{med(timings.gather) * 1000:11.3f}"
            f"{med(timings.save_call) * 1000:10.2f}{plain * 1000:15.2f}"
            f"{_p90(timings.torch_save) * 1000:9.2f}{med(timings.save_rename) * 1000:12.2f}"
            f"{ratio:8.2f}"
        )
        result[label] = {
            "blocked_ms": round(blocked * 1000, 3),
            "torch_save_ms": round(plain * 1000, 3),
            "ratio": round(ratio, 3),
            "state_mb": round(timings.state_bytes / MB, 3),
            "torch_save_rename_ms": round(med(timings.save_rename) * 1000, 3),
        }
    print()
    print(
        "blocked = checkpoint_due() True -> save_checkpoint returned; gather = the recipe "
        "building its state dictionary; save = ctx.save_checkpoint (check, torch.save to a "
        "temporary file, rename, @@checkpoint line); +rename = torch.save to a temporary "
        "name, then os.replace; ratio = blocked / torch.save"
    )
    print(f"RESULT {json.dumps(result)}")


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
