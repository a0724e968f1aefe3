"""The recipe interface: what a recipe declares (name, parameter schema, dataset formats), how its
parameters are validated, and the context the job's child process hands it while it trains or
predicts, in one process or as one rank of several (data parallel).

The web process imports this module to validate parameters, so torch is imported only inside
the functions that need it.
"""

from __future__ import annotations

import abc
import copy
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import factory_job
from jobs.runner.protocol import DEFAULT_CHUNK_ROWS, StrictValidator
from tenants.errors import DomainError

if TYPE_CHECKING:
    import torch

    from registry.formats.csv_reader import CsvDialect

WEIGHTS_FILENAME = "model.safetensors"
CONFIG_FILENAME = "config.json"
PREDICTIONS_FILENAME = "predictions.csv"
# At most one @@progress line per this many seconds, so a fast loop does not flood the parent.
PROGRESS_EVERY_S = 1.0
# Predicting takes no parameters unless a recipe declares some.
NO_PARAMETERS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {},
}


OnlinePredictor = Callable[[list[Any]], list[dict[str, Any]]]


def online_input_object(item: Any, position: int, key: str, kind: type, what: str) -> Any:
    """`item[key]`, checked: the item is an object and the value of type `kind` (`what` in
    words); RecipeInputError naming the item otherwise."""
    if not isinstance(item, Mapping):
        raise RecipeInputError(f'inputs[{position}] must be an object like {{"{key}": {what}}}.')
    value = item.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise RecipeInputError(f"inputs[{position}].{key} must be {what}.")
    return value


def class_probabilities(classes: list[Any], probabilities: list[list[float]]) -> list[dict]:
    """Classifier outputs: the most likely class (as text) and every class's probability."""
    outputs = []
    for row in probabilities:
        best = max(range(len(row)), key=row.__getitem__)
        outputs.append(
            {
                "label": str(classes[best]),
                "probabilities": {
                    str(label): float(p) for label, p in zip(classes, row, strict=True)
                },
            }
        )
    return outputs


class RecipeParameterError(DomainError):
    code = "invalid_parameters"
    status = 400


class RecipeInputError(Exception):
    """The data (or a checkpoint that does not belong to it) cannot be trained on; the message
    tells the tenant what to change. The child exits EXIT_BAD_INPUT with it."""


@dataclass(frozen=True)
class RecipeResult:
    """What a finished training run (or prediction) reports; the child adds the resolved
    parameters, or `parameters` where the recipe had to change some (a fine-tune keeps its
    model's architecture whatever the parameters say)."""

    metrics: dict[str, Any]
    artifacts: dict[str, str]
    input_signature: dict[str, Any]
    parameters: dict[str, Any] | None = None


class Recipe(abc.ABC):
    """Platform code that turns a dataset and parameters into a model; tenants only choose one."""

    name: ClassVar[str]
    version: ClassVar[str]
    kind: ClassVar[str] = "train"
    parameter_schema: ClassVar[dict[str, Any]]
    predict_parameter_schema: ClassVar[dict[str, Any]] = NO_PARAMETERS_SCHEMA
    dataset_formats: ClassVar[tuple[str, ...]]
    # True when `train` works as one rank of several (ctx.world_size > 1); see `train`.
    distributed: ClassVar[bool] = False
    # True when `online_predictor` serves the recipe's models (a deployment's replicas).
    online: ClassVar[bool] = False
    # The evaluation gate's metric, and whether higher is better: the mean of the per-row scores
    # `validation_outcomes` reports. serving.selectors.LIVE_METRICS judges live predictions by
    # the same one.
    gate_metric: ClassVar[tuple[str, bool]] = ("accuracy", True)
    # What the gate's slices are. None: the values of the dataset column a retrain policy names.
    # A word: data without columns to choose from is sliced one way only, which a policy asks
    # for by naming this word (the image classifier's "class", the forecaster's "series").
    gate_slice_by: ClassVar[str | None] = None

    @abc.abstractmethod
    def train(self, ctx: RecipeContext) -> RecipeResult | None:
        """Train, checkpointing when `ctx.checkpoint_due()`; when `ctx.should_stop()`, save a
        checkpoint and return None. Resuming from `ctx.resume_state` continues the same run.

        With `ctx.model_dir` set, start from that model's weights and preprocessing (fine-tune)
        and raise RecipeInputError saying what differs when the data does not fit it.

        A recipe with `distributed = True` may run as rank `ctx.rank` of `ctx.world_size`
        processes (torch.distributed is initialised, see jobs.recipes.distributed): it trains
        on its shard of the data, calls `ctx.should_stop()` at the same points on every rank
        (it is a collective there), and keeps every rank's state identical. The context makes
        the other ranks silent: only rank 0 prints lines and writes checkpoints and artifacts.
        """

    @abc.abstractmethod
    def evaluate(self, ctx: RecipeContext) -> dict[str, Any]:
        """Metrics of the model in `ctx.model_dir` on the dataset in `ctx.dataset_path`."""

    def validation_outcomes(
        self, ctx: RecipeContext, *, model_dirs: dict[str, Path], split_seed: int, slice_column: str
    ) -> tuple[dict[str, list[float]], list[str | None]]:
        """For the evaluation gate (jobs.runner.evaluate): each model in `model_dirs` (by role)
        scored on each held-out row of the dataset in `ctx.dataset_path`, so that the mean of a
        model's scores is its `gate_metric` (a classifier's True or False counts 1 or 0), and
        each row's slice (None where it has none, or where `slice_column` is empty). The rows
        are the validation split a training run of `ctx.parameters` seeded with `split_seed`
        held out, so a model that run made never saw them."""
        raise RecipeInputError(f"Recipe {self.name!r} cannot be evaluated by the gate.")

    def predict(self, ctx: RecipeContext) -> RecipeResult | None:
        """Batch inference with the model in `ctx.model_dir` (its `model.safetensors` and
        `config.json`) on the dataset in `ctx.dataset_path`.

        Read the dataset in chunks of at most `ctx.chunk_rows` rows, so that memory stays flat
        whatever its size, and write `ctx.output_dir / PREDICTIONS_FILENAME` as CSV: the input's
        columns that are not the target, in order, then the prediction columns (for classifiers
        `prediction`, the class, and `probability`, the predicted class's probability), one row
        per input row in the input's order. Report `ctx.progress(rows done, total rows or None,
        1)` after each chunk. When `ctx.should_stop()`, return None and leave no predictions
        file. Data the model cannot read (missing columns, values of the wrong type) is a
        RecipeInputError that names the column and the row or line.

        Return RecipeResult(metrics={"rows": rows predicted}, artifacts={PREDICTIONS_FILENAME:
        ctx.relative(path)}, input_signature={}). Parameters, if any, follow
        `predict_parameter_schema`.
        """
        raise NotImplementedError(f"Recipe {self.name!r} has no batch inference yet.")

    @classmethod
    def online_predictor(cls, model_dir: Path, device: str = "cpu") -> OnlinePredictor:
        """Load the model in `model_dir` once and return what answers a replica's requests:
        a list of JSON inputs -> one JSON output per input, in order (see
        jobs/services/replicas.py for the shapes per kind of model). Inputs the model cannot
        read raise RecipeInputError naming the item (`inputs[i]`), in words safe for the tenant.
        The predictor is called from one thread at a time."""
        raise NotImplementedError(f"Recipe {cls.name!r} does not serve online.")


def validate_parameters(
    recipe_cls: type[Recipe], params: Any, *, task: str = "train"
) -> dict[str, Any]:
    """`params` with the schema's defaults filled in; RecipeParameterError naming each bad field.

    `task` "predict" checks them against the recipe's `predict_parameter_schema` instead.
    """
    if not isinstance(params, Mapping):
        raise RecipeParameterError(
            "Parameters must be a JSON object.",
            fields={"parameters": ["Must be an object of parameter names to values."]},
        )
    schema = (
        recipe_cls.predict_parameter_schema if task == "predict" else recipe_cls.parameter_schema
    )
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
    state = factory_job.read_checkpoint(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a checkpoint dictionary.")
    return state


@dataclass
class RecipeContext:
    """Everything a recipe may touch while it runs: its inputs, where outputs go, and the only
    channel back to the parent: lines through `emit`, written by the in-job library's
    LineWriter (`lines`), the same one a tenant's package writes through, and checkpoints
    written and read by the library's functions.

    `model_dir` is the model to predict with or to fine-tune. `rank` and `world_size` place
    this process among data-parallel ones (0 and 1 alone); `chunk_rows` bounds the rows a
    streaming reader holds at once. `csv_dialect` is the one the registry stored for a CSV
    dataset; read CSVs only through `jobs.recipes.data.csv_chunks` with it (None: a version
    recorded before dialects were stored, which the reader detects as the upload did).
    """

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
    emit: Callable[[str], None] = factory_job._write_stdout
    rank: int = 0
    world_size: int = 1
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    csv_dialect: CsvDialect | None = None
    lines: factory_job.LineWriter = field(init=False, repr=False)
    _started: float = field(default_factory=time.monotonic, init=False, repr=False)
    _last_checkpoint: float = field(default_factory=time.monotonic, init=False, repr=False)
    _last_progress: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # Through `emit` as it is at each line: a caller may swap it after construction.
        self.lines = factory_job.LineWriter(lambda line: self.emit(line))

    @property
    def device(self) -> str:
        return "cuda" if self.devices[0].startswith("cuda") else "cpu"

    @property
    def is_main(self) -> bool:
        """True on the process that speaks for the run: the only one, or rank 0."""
        return self.rank == 0

    def log(self, message: str) -> None:
        # Messages quote tenant data (column names, values): the writer escapes the prefix.
        self.lines.text(message)

    def log_metric(self, step: int, name: str, value: float, split: str) -> None:
        self.lines.metric(step=step, name=name, value=value, split=split)

    def progress(self, step: int, total: int | None, epoch: int) -> None:
        now = time.monotonic()
        due = self._last_progress is None or now - self._last_progress >= PROGRESS_EVERY_S
        if due or step == total:
            self._last_progress = now
            self.lines.progress(step=step, total=total, epoch=epoch)

    def should_stop(self) -> bool:
        """True once SIGTERM arrived or max_runtime_s has passed.

        With world_size > 1 it is a collective: every rank must call it at the same points,
        and all of them get True as soon as any one of them would, so they stop together.
        """
        stop = self.stop_event.is_set()
        if (
            not stop
            and self.max_runtime_s is not None
            and time.monotonic() - self._started >= self.max_runtime_s
        ):
            self.log(f"Stopping: the maximum runtime of {self.max_runtime_s:g} s was reached.")
            stop = True
        if self.world_size > 1:
            from jobs.recipes.distributed import any_rank

            stop = any_rank(stop)
        if stop:
            self.stop_event.set()
        return stop

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s

    def save_checkpoint(self, state: dict[str, Any], step: int) -> Path:
        """Write `state` (tensors and plain data only, so that it loads with weights_only=True)
        and announce it once complete. Only rank 0 writes; every rank gets the path."""
        path = self.checkpoint_dir / f"ckpt-{step:08d}.pt"
        if not self.is_main:
            return path
        _check_checkpoint_value(state, "state")
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        # No fsync: the file lives only until the parent uploads it, and a crash loses the
        # working directory anyway.
        factory_job.write_checkpoint(state, path)
        self._last_checkpoint = time.monotonic()
        self.lines.checkpoint(path=self.relative(path), step=step)
        return path

    def write_artifacts(
        self, weights: Mapping[str, torch.Tensor], config: Mapping[str, Any]
    ) -> dict[str, str]:
        """Save the weights as safetensors and the config as JSON; their paths for @@result.
        Only rank 0 writes; every rank gets the paths."""
        from safetensors.torch import save_file

        weights_path = self.output_dir / WEIGHTS_FILENAME
        config_path = self.output_dir / CONFIG_FILENAME
        artifacts = {
            WEIGHTS_FILENAME: self.relative(weights_path),
            CONFIG_FILENAME: self.relative(config_path),
        }
        if not self.is_main:
            return artifacts
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
        save_file(tensors, weights_path, metadata={"format": "pt"})
        config_path.write_text(
            json.dumps(config, indent=2, sort_keys=True, allow_nan=False), encoding="utf-8"
        )
        return artifacts

    def relative(self, path: Path) -> str:
        """`path` as the lines name it: relative to the working directory, which holds it."""
        return (self.workdir / path).resolve().relative_to(self.workdir.resolve()).as_posix()


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
