"""The in-job library: what a tenant's own training code calls, inside the sandbox.

    import factory_job

    def run():
        p = factory_job.params()               # the job's parameters, checked against the schema
        state = factory_job.latest() or {"step": 0}   # the checkpoint to resume from, if any
        for step in range(state["step"] + 1, p["steps"] + 1):
            loss = ...
            factory_job.log(step=step, loss=loss)
            factory_job.save({"step": step, ...}, step=step)
            if factory_job.should_stop():     # preempted or cancelled: checkpointed, so return
                return
        factory_job.register_model("model.safetensors", {"hidden": 32})

A package whose manifest names a `predict` entry serves its models too, in batch inference jobs
and in a deployment's replicas. The entry is called once with the model's folder (its
model.safetensors and config.json) and returns the function that answers: a list of inputs (JSON
values) in, a list of outputs (JSON values) out, one per input, in order.

    def load(model_dir):
        model = ...                           # read model_dir + "/model.safetensors"
        def predict(inputs):
            for i, item in enumerate(inputs):
                if "x" not in item:
                    raise factory_job.BadInput(f"inputs[{i}] has no x")
            return [{"y": model(item["x"])} for item in inputs]
        return predict

A batch job gives it the dataset's rows as `{column: value}` objects, chunk by chunk, and
registers what it returns as a CSV dataset (a `row` column, then one column per key of the
outputs); a replica gives it the `inputs` of each request and returns the outputs as they are.

It speaks the line protocol of jobs.runner.protocol to the trusted parent (the worker) on stdout
and holds no credential: the parent downloaded and verified the inputs before the child started,
and uploads what the child registers after it ends. The child only names files in its work folder;
the parent decides the job, the attempt, the output's name and number, and refuses any line or
path it does not accept (the attempt then fails, saying why).

Pure Python, standard library only (torch is used for checkpoints when the runtime has it), so
it runs under any runtime's interpreter without Django or the platform's packages.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "BadInput",
    "LineWriter",
    "checkpoint_dir",
    "inputs",
    "latest",
    "log",
    "params",
    "progress",
    "read_checkpoint",
    "register_dataset",
    "register_model",
    "save",
    "should_stop",
    "write_checkpoint",
]

# The parent writes the job's description here; its paths are the sandbox's (/job/...).
SPEC_ENV = "FACTORY_JOB_SPEC"
DEFAULT_SPEC = "/job/job.json"
# A sandbox started ahead of its job (`python -m factory_job --warm`) waits for "go" on this
# descriptor, then reads its job as any other.
WARM_FLAG = "--warm"
GO_FD_ENV = "FACTORY_JOB_GO_FD"
GO = b"go\n"
LINE_PREFIX = "@@"
# The exit codes of jobs.runner.protocol (a test checks they stay the same).
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3
MAX_METRIC_NAME = 100

_stop = threading.Event()
_lock = threading.Lock()
_spec: dict | None = None
_last_metrics: dict[str, float] = {}
_artifacts: dict[str, str] = {}


class BadInput(Exception):
    """Raise it when the parameters or the data cannot be trained on: the job fails with your
    message as its reason, as an input error rather than a crash."""


def _job() -> dict:
    global _spec
    with _lock:
        if _spec is None:
            path = Path(os.environ.get(SPEC_ENV, DEFAULT_SPEC))
            _spec = json.loads(path.read_text(encoding="utf-8"))
        return _spec


def _work() -> Path:
    return Path(_job()["work_folder"])


class LineWriter:
    """The child's side of the line protocol (jobs.runner.protocol), the one both a package's
    calls here and the platform's recipes (jobs.recipes.base.RecipeContext) write through: each
    method checks what it is given, as the parent will, and hands `write` one line.

    `write` takes a line without its newline: stdout for a job's one process, nothing for the
    ranks of a data-parallel run that are not rank 0, a list in a test.
    """

    def __init__(self, write: Callable[[str], None]):
        self.write = write

    def line(self, kind: str, payload: dict) -> None:
        self.write(structured_line(kind, payload))

    def text(self, message: object) -> None:
        """Plain log lines. A line of the job's that starts with the prefix (it may quote the
        tenant's data) gets a leading space, so it never reads as a structured one."""
        for line in str(message).splitlines() or [""]:
            self.write(f" {line}" if line.startswith(LINE_PREFIX) else line)

    def metric(self, *, step: int, name: str, value: float, split: str = "train") -> float:
        _check_step(step)
        if split not in ("train", "val"):
            raise ValueError(f'split must be "train" or "val", not {split!r}.')
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"Metric {name} is {value} at step {step}; metrics must be finite.")
        if not name or len(name) > MAX_METRIC_NAME:
            raise ValueError(
                f"A metric's name is 1 to {MAX_METRIC_NAME} characters: {name[:20]!r}."
            )
        self.line("metric", {"step": step, "name": name, "value": value, "split": split})
        return value

    def progress(self, *, step: int, total: int | None, epoch: int) -> None:
        _check_step(step)
        _check_step(epoch)
        if total is not None:
            _check_step(total)
        self.line("progress", {"step": step, "total": total, "epoch": epoch})

    def checkpoint(self, *, path: str, step: int) -> None:
        _check_step(step)
        self.line("checkpoint", {"path": path, "step": step})

    def result(
        self, *, metrics: dict, artifacts: dict, input_signature: dict, parameters: dict
    ) -> None:
        self.line(
            "result",
            {
                "metrics": metrics,
                "artifacts": artifacts,
                "input_signature": input_signature,
                "parameters": parameters,
            },
        )


def structured_line(kind: str, payload: dict) -> str:
    """`@@kind {json}`: plain JSON (ValueError for NaN or infinity), ASCII, on one line."""
    text = json.dumps(payload, allow_nan=False, ensure_ascii=True, separators=(",", ":"))
    return f"{LINE_PREFIX}{kind} {text}"


def _check_step(step: object) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, not {step!r}.")


def _write_stdout(line: str) -> None:
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


_out = LineWriter(_write_stdout)


def _relative(path: str | os.PathLike, what: str) -> str:
    """`path` (absolute, or relative to the working folder) as the parent reads it: relative to
    the work folder. The parent checks again; this only says the mistake early and in words."""
    work = _work()
    full = Path(os.path.abspath(Path(work, path)))
    try:
        relative = full.relative_to(work)
    except ValueError:
        raise ValueError(
            f"{what} {path} is outside the work folder {work}; write it there."
        ) from None
    if full.is_symlink() or not full.is_file():
        raise ValueError(f"{what} {path} is not a regular file (links are refused).")
    return relative.as_posix()


def params() -> dict:
    """The job's parameters, checked against the package's JSON Schema when it was submitted."""
    return dict(_job()["parameters"])


def inputs() -> dict[str, str]:
    """Paths of the job's inputs, downloaded and verified by the parent: "dataset" (a file, e.g.
    /job/inputs/dataset.csv) and "model" (a folder with model.safetensors and config.json), each
    present only when the job has it."""
    return dict(_job()["inputs"])


def log(*, step: int, split: str = "train", **metrics: float) -> None:
    """Record metrics at `step` (an integer >= 0): each becomes a point of the job's curves.
    `split` is "train" or "val"."""
    for name, value in metrics.items():
        _last_metrics[name] = _out.metric(step=step, name=name, value=value, split=split)


def progress(step: int, total: int | None = None, *, epoch: int = 1) -> None:
    """Say how far the run is: `step` of `total` (None when unknown) in `epoch`; the job's page
    shows it at once, before any metric."""
    _out.progress(step=step, total=total, epoch=epoch)


def checkpoint_dir() -> Path:
    """The folder checkpoints are written to; the parent uploads (and then removes) each one
    `save` announces."""
    return _work() / _job()["checkpoint_dir"]


def save(state: Any, *, step: int) -> Path:
    """Write `state` as the checkpoint of `step` and hand it to the parent, which keeps the last
    one: a resumed attempt (another worker, after a preemption) gets it back from `latest()`.

    With torch in the runtime, `state` may hold tensors (torch.save); without, it must be JSON.
    """
    _check_step(step)
    folder = checkpoint_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = write_checkpoint(state, folder / f"ckpt-{step:08d}.pt")
    _out.checkpoint(path=path.relative_to(_work()).as_posix(), step=step)
    return path


def write_checkpoint(state: Any, path: Path) -> Path:
    """Write `state` to `path` whole or not at all (the parent reads only a complete file):
    torch.save where torch is installed, else JSON."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        import torch
    except ImportError:
        partial.write_text(json.dumps(state, allow_nan=False), encoding="utf-8")
    else:
        torch.save(state, partial)
    os.replace(partial, path)
    return path


def read_checkpoint(path: Path) -> Any:
    """A checkpoint `write_checkpoint` wrote: JSON, or torch's with tensors and plain data only
    (weights_only), onto the CPU."""
    with path.open("rb") as file:
        head = file.read(2)
    if head[:1] in (b"{", b"[", b'"') or head.isdigit():
        return json.loads(path.read_text(encoding="utf-8"))
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def latest() -> Any | None:
    """The state of the checkpoint this attempt resumes from, or None on a first run."""
    resume = _job().get("resume_from")
    return read_checkpoint(_work() / resume) if resume else None


def should_stop() -> bool:
    """True once the parent asked the job to stop (preemption, cancel, its wall clock): save a
    checkpoint and return from the entry point; the job resumes from it when it is placed again."""
    return _stop.is_set()


def register_model(weights_path: str | os.PathLike, config: dict) -> None:
    """Register the run's model: safetensors weights (a file in the work folder) and a JSON
    config. The parent uploads them after the entry point returns, into the model the job names,
    with lineage to this package version and the job's inputs."""
    if not isinstance(config, dict):
        raise ValueError("config must be a dict (it is stored as the version's config.json).")
    relative = _relative(weights_path, "The weights file")
    text = json.dumps(config, allow_nan=False)
    output = _work() / _job()["output_dir"]
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(text, encoding="utf-8")
    _artifacts["model.safetensors"] = relative
    _artifacts["config.json"] = (output / "config.json").relative_to(_work()).as_posix()


def register_dataset(path: str | os.PathLike) -> None:
    """Register a file in the work folder (CSV, Parquet, .npz, a zip of images) as a new version
    of the dataset the job names; the parent validates it like an upload."""
    _artifacts["dataset"] = _relative(path, "The dataset file")


def _result() -> dict:
    return {
        "metrics": dict(_last_metrics),
        "artifacts": dict(_artifacts),
        "input_signature": {},
        "parameters": params(),
    }
