"""What the recipe tests share: a context on the CPU that keeps the lines a recipe emits (and one
that is stopped after a given step), the events among those lines, the weights a run wrote, and
torch set up as the job's child sets it up."""

import csv
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from jobs.recipes.base import Recipe, RecipeContext, validate_parameters
from jobs.runner.protocol import parse_line


class Lines(list):
    """Stands in for the child's stdout: keeps every line the recipe emits."""

    def __call__(self, line: str) -> None:
        self.append(line)


def recipe_context(
    recipe: type[Recipe],
    workdir: Path,
    dataset: Path,
    parameters: dict,
    cls: type = RecipeContext,
    **settings,
) -> RecipeContext:
    """A context for `recipe` on the CPU that checkpoints only when stopped; `settings` (the
    seed among them) are the context's other fields or override these."""
    defaults = {
        "workdir": workdir,
        "dataset_path": dataset,
        "dataset_format": dataset.suffix.lstrip("."),
        "parameters": validate_parameters(recipe, parameters),
        "output_dir": workdir / "out",
        "checkpoint_dir": workdir / "checkpoints",
        "checkpoint_every_s": 3600.0,
        "devices": ["cpu"],
        "emit": Lines(),
    }
    return cls(**(defaults | settings))


@dataclass
class StopAfterStep(RecipeContext):
    """Stands in for SIGTERM arriving once `stop_at` steps are done."""

    stop_at: int = 0

    def progress(self, step: int, total: int | None, epoch: int) -> None:
        super().progress(step, total, epoch)
        if step == self.stop_at:
            self.stop_event.set()


def events(ctx: RecipeContext, kind: str) -> list[dict]:
    return [payload for k, payload in map(parse_line, ctx.emit) if k == kind]


def weights(ctx: RecipeContext) -> dict[str, torch.Tensor]:
    return load_file(ctx.output_dir / "model.safetensors")


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@contextmanager
def one_torch_thread(*, deterministic: bool = False) -> Iterator[None]:
    """One thread for torch, and with `deterministic` only deterministic algorithms, as the
    child uses on the CPU; what was set before comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if deterministic:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if deterministic:
            torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)


ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 60


@dataclass
class ChildRun:
    returncode: int
    lines: list[tuple[str, object]]
    stderr: str

    def of(self, kind: str) -> list[dict]:
        return [payload for k, payload in self.lines if k == kind]

    def structured(self) -> list[tuple[str, dict]]:
        return [(kind, payload) for kind, payload in self.lines if kind != "log"]


def run_child(workdir: Path, on_line=None) -> ChildRun:
    """Run the child to its end, handing each parsed stdout line to `on_line(process, line)`."""
    stderr_path = workdir / "stderr.txt"
    with stderr_path.open("w") as stderr:  # a file, so a chatty stderr cannot fill a pipe
        process = subprocess.Popen(
            [sys.executable, "-m", "jobs.runner.child", str(workdir)],
            cwd=ROOT,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    watchdog = threading.Timer(CHILD_TIMEOUT_S, process.kill)
    watchdog.start()
    try:
        lines = []
        for raw in process.stdout:
            lines.append(parse_line(raw))
            if on_line is not None:
                on_line(process, lines[-1])
        returncode = process.wait()
    finally:
        watchdog.cancel()
        process.stdout.close()
    return ChildRun(returncode, lines, stderr_path.read_text())
