"""The recipe interface: what a recipe declares (name, parameter schema, dataset formats), how its
parameters are validated, and the context the job's child process hands it while it trains.

The web process imports this module to validate parameters, so torch is imported only inside
the functions that need it.
"""

from __future__ import annotations

import abc
import copy
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from jobs.runner.protocol import StrictValidator, format_line
from tenants.errors import DomainError

if TYPE_CHECKING:
    import torch

WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
# At most one @@progress line per this many seconds, so a fast loop does not flood the parent.
PROGRESS_EVERY_S = 1.0


class RecipeParameterError(DomainError):
    code = "invalid_parameters"
    status = 400


class RecipeInputError(Exception):
    """The data (or a checkpoint that does not belong to it) cannot be trained on; the message
    tells the tenant what to change. The child exits EXIT_BAD_INPUT with it."""


@dataclass(frozen=True)
class RecipeResult:
    """What a finished training run reports; the child adds the resolved parameters."""

    metrics: dict[str, Any]
    artifacts: dict[str, str]
    input_signature: dict[str, Any]


class Recipe(abc.ABC):
    """Platform code that turns a dataset and parameters into a model; tenants only choose one."""

    name: ClassVar[str]
    version: ClassVar[str]
    kind: ClassVar[str] = "train"
    parameter_schema: ClassVar[dict[str, Any]]
    dataset_formats: ClassVar[tuple[str, ...]]

    @abc.abstractmethod
    def train(self, ctx: RecipeContext) -> RecipeResult | None:
        """Train, checkpointing when `ctx.checkpoint_due()`; when `ctx.should_stop()`, save a
        checkpoint and return None. Resuming from `ctx.resume_state` continues the same run."""

    @abc.abstractmethod
    def evaluate(self, ctx: RecipeContext) -> dict[str, Any]:
        """Metrics of the model in `ctx.model_dir` on the dataset in `ctx.dataset_path`."""

    def predict(self, ctx: RecipeContext) -> None:
        raise NotImplementedError(f"Recipe {self.name!r} has no batch inference yet.")


def validate_parameters(recipe_cls: type[Recipe], params: Any) -> dict[str, Any]:
    """`params` with the schema's defaults filled in; RecipeParameterError naming each bad field."""
    if not isinstance(params, Mapping):
        raise RecipeParameterError(
            "Parameters must be a JSON object.",
            fields={"parameters": ["Must be an object of parameter names to values."]},
        )
    schema = recipe_cls.parameter_schema
    defaults = {
        name: copy.deepcopy(spec["default"])
        for name, spec in schema.get("properties", {}).items()
        if "default" in spec
    }
    resolved = defaults | dict(params)
    fields: dict[str, list[str]] = {}
    for error in StrictValidator(schema).iter_errors(resolved):
        for key, message in _field_messages(error, schema):
            fields.setdefault(key, []).append(message)
    if fields:
        raise RecipeParameterError(
            f"The parameters are not valid for recipe {recipe_cls.name!r}.", fields=fields
        )
    return resolved


def _field_messages(error: Any, schema: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, message) pairs for one jsonschema error, in words a form can show; the field is
    `parameters.<name>`."""
    path = list(error.absolute_path)
    if not path:
        known = schema.get("properties", {})
        if error.validator == "required":
            missing = [name for name in error.validator_value if name not in error.instance]
            return [(f"parameters.{name}", "This parameter is required.") for name in missing]
        if error.validator == "additionalProperties":
            message = f"Unknown parameter; this recipe accepts: {', '.join(sorted(known))}."
            return [
                (f"parameters.{name}", message) for name in sorted(set(error.instance) - set(known))
            ]
        return [("parameters", error.message)]
    message = _describe(error)
    if len(path) > 1:
        where = f"Item {path[1] + 1}" if isinstance(path[1], int) else str(path[1])
        message = f"{where}: {message[0].lower()}{message[1:]}"
    return [(f"parameters.{path[0]}", message)]


_TYPE_WORDS = {
    "integer": "a whole number",
    "number": "a number",
    "string": "text",
    "boolean": "true or false",
    "array": "a list",
    "object": "an object",
}


def _describe(error: Any) -> str:
    bound = error.validator_value
    match error.validator:
        case "type":
            expected = [bound] if isinstance(bound, str) else bound
            return f"Must be {' or '.join(_TYPE_WORDS.get(kind, kind) for kind in expected)}."
        case "minimum":
            return f"Must be at least {bound}."
        case "maximum":
            return f"Must be at most {bound}."
        case "exclusiveMinimum":
            return f"Must be greater than {bound}."
        case "exclusiveMaximum":
            return f"Must be less than {bound}."
        case "minLength" if bound == 1:
            return "Must not be empty."
        case "minItems":
            return f"Must have at least {bound} items."
        case "maxItems":
            return f"Must have at most {bound} items."
        case "enum":
            return f"Must be one of: {', '.join(map(str, bound))}."
    return error.message


def default_devices() -> list[str]:
    """The torch devices this process may use: every visible GPU, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return ["cpu"]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by RecipeContext.save_checkpoint, unpickling tensors and plain data
    only, onto the CPU (the recipe moves it where it trains)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a checkpoint dictionary.")
    return state


def _print_line(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass
class RecipeContext:
    """Everything a recipe may touch while it runs: its inputs, where outputs go, and the only
    channel back to the parent (structured lines through `emit`)."""

    workdir: Path
    dataset_path: Path
    dataset_format: str
    parameters: dict[str, Any]
    seed: int
    output_dir: Path
    checkpoint_dir: Path
    checkpoint_every_s: float = 300.0
    resume_state: dict[str, Any] | None = None
    max_runtime_s: float | None = None
    model_dir: Path | None = None
    devices: list[str] = field(default_factory=default_devices)
    stop_event: threading.Event = field(default_factory=threading.Event)
    emit: Callable[[str], None] = _print_line
    _started: float = field(default_factory=time.monotonic, init=False, repr=False)
    _last_checkpoint: float = field(default_factory=time.monotonic, init=False, repr=False)
    _last_progress: float | None = field(default=None, init=False, repr=False)

    @property
    def device(self) -> str:
        return "cuda" if self.devices[0].startswith("cuda") else "cpu"

    def log(self, message: str) -> None:
        # Messages quote tenant data (column names, values); a line of theirs that starts with
        # the prefix must not read as a structured line, so it gets a leading space.
        for line in str(message).splitlines() or [""]:
            self.emit(f" {line}" if line.startswith("@@") else line)

    def log_metric(self, step: int, name: str, value: float, split: str) -> None:
        payload = {"step": step, "name": name, "value": float(value), "split": split}
        self.emit(format_line("metric", payload))

    def progress(self, step: int, total: int | None, epoch: int) -> None:
        now = time.monotonic()
        due = self._last_progress is None or now - self._last_progress >= PROGRESS_EVERY_S
        if due or step == total:
            self._last_progress = now
            self.emit(format_line("progress", {"step": step, "total": total, "epoch": epoch}))

    def should_stop(self) -> bool:
        """True once SIGTERM arrived or max_runtime_s has passed."""
        if self.stop_event.is_set():
            return True
        if (
            self.max_runtime_s is not None
            and time.monotonic() - self._started >= self.max_runtime_s
        ):
            self.log(f"Stopping: the maximum runtime of {self.max_runtime_s:g} s was reached.")
            self.stop_event.set()
            return True
        return False

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s

    def save_checkpoint(self, state: dict[str, Any], step: int) -> Path:
        """Write `state` (tensors and plain data only, so that it loads with weights_only=True)
        and announce it once complete."""
        import torch

        _check_checkpoint_value(state, "state")
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / f"ckpt-{step:08d}.pt"
        # No fsync: the file lives only until the parent uploads it, and a crash loses the
        # working directory anyway. The rename keeps the parent from reading a partial file.
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)
        self._last_checkpoint = time.monotonic()
        self.emit(format_line("checkpoint", {"path": self._relative(path), "step": step}))
        return path

    def write_artifacts(
        self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> dict[str, str]:
        """Save the weights as safetensors and the config as JSON; their paths for @@result."""
        from safetensors.torch import save_file

        self.output_dir.mkdir(parents=True, exist_ok=True)
        weights_path = self.output_dir / WEIGHTS_FILENAME
        config_path = self.output_dir / CONFIG_FILENAME
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
        save_file(tensors, weights_path, metadata={"format": "pt"})
        config_path.write_text(
            json.dumps(config, indent=2, sort_keys=True, allow_nan=False), encoding="utf-8"
        )
        return {
            WEIGHTS_FILENAME: self._relative(weights_path),
            CONFIG_FILENAME: self._relative(config_path),
        }

    def _relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.workdir.resolve()).as_posix()


def _check_checkpoint_value(value: Any, where: str) -> None:
    import torch

    if value is None or isinstance(value, str | int | float | bool | torch.Tensor):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where} has a key of type {type(key).__name__}.")
            _check_checkpoint_value(item, f"{where}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_checkpoint_value(item, f"{where}[{index}]")
    else:
        raise TypeError(
            f"{where} is a {type(value).__name__}; checkpoints hold only tensors and plain data."
        )
