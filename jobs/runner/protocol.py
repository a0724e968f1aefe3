"""What the job's child process and its parent (the GPU worker) say to each other: the spec file
the parent writes, the lines the child prints on stdout, and the child's exit codes.

Both sides import this module, so it imports neither torch nor Django.

The parent prepares a working directory, puts the inputs in it and writes `spec.json`:

    {
      "task": "train" | "predict" | "serve" | "evaluate" | "export",  # default "train"
      "recipe": "tabular-classifier",           # a name from jobs.recipes.catalog
      "parameters": {...},                       # validated (and defaults filled) by the child
      "dataset": {"path": "data.csv", "format": "csv" | "parquet",
                  "csv_dialect": {...} | null},   # optional: the version's stored CSV dialect
      "model_dir": "model" | null,               # optional, default null; see below
      "resume_from": "ckpt-00000120.pt" | null,  # a checkpoint the child printed, downloaded again
      "output_dir": "out",                       # where the artifacts go
      "checkpoint_dir": "checkpoints",
      "checkpoint_every_s": 300.0,               # 0 checkpoints after every step
      "seed": 1234,
      "max_runtime_s": 3600.0 | null,            # the child stops itself, as on SIGTERM, after
                                                 # this many seconds of its own run
      "processes": 1,                            # optional, default 1: data-parallel processes
      "chunk_rows": 10000,                       # optional, default 10000: rows read at a time
      "serve": {"host": "127.0.0.1", "token": "...", "max_items": 100,
                "max_body_bytes": 8388608, "drain_s": 30.0}   # task "serve" only
    }

Input paths (dataset, model_dir, resume_from) are absolute or relative to the working directory;
output_dir and checkpoint_dir must lie inside it, so every path the child prints is relative to
it. The parent reads each such path only as a regular file reached through no link (see
`jobs.runner.isolation.child_file_open`); anything else fails the attempt, saying so.

`task` "train" makes a model; with `model_dir` set it fine-tunes that model instead of starting
from scratch (its weights and preprocessing; the dataset must have the same columns and no class
the model lacks, else EXIT_BAD_INPUT). `task` "predict" runs batch inference: `model_dir` is
required, `parameters` are checked against the recipe's `predict_parameter_schema` (usually no
parameters: `{}`), `resume_from` must be null, and the dataset is read `chunk_rows` rows at a
time, so memory stays flat whatever its size. `model_dir` holds a model version's artifacts
(`model.safetensors`, `config.json`) as a training run's @@result named them.

`task` "evaluate" scores the model in `model_dir` against a second one on a held-out split, for
serving's gate; its inputs, result and coverage are in jobs.runner.evaluate.

`task` "export" writes the model in `model_dir` as an ONNX edge bundle and checks it
(jobs.runner.export); it reads no dataset (null) and does not resume.

`task` "serve" runs a replica: `model_dir` is required, `dataset` and `resume_from` are left out
(null), and the child loads the model once, through the recipe's `online_predictor`, and answers
HTTP on `serve.host` at a free port until SIGTERM (jobs.runner.serve has the requests it takes).
`serve.token` is the bearer token requests must carry: derived for this attempt, the only secret
the child holds. Once it accepts connections it prints

    @@serving {"port": 8123}

and on SIGTERM it stops accepting, answers the requests in flight (for at most `drain_s`
seconds), then exits EXIT_STOPPED. `max_runtime_s` does not apply to it.

`processes` > 1 trains data-parallel with torch.distributed, one process per GPU (`cuda:<rank>`
within CUDA_VISIBLE_DEVICES, which must show at least that many), or that many CPU processes when
no GPU is visible; only a recipe with `distributed = True` accepts it (else EXIT_BAD_INPUT). The
lines and exit codes are the same as for one process: only rank 0 prints and writes, and SIGTERM
to the child stops every rank at the same step. A checkpoint resumes only with the same number
of processes. Predict always runs in one process.

The child prints one line per event; a structured line is `@@<kind> <JSON object>`:

    @@metric {"step": 120, "name": "loss", "value": 0.41, "split": "train" | "val"}
    @@checkpoint {"path": "checkpoints/ckpt-00000120.pt", "step": 120}
    @@progress {"step": 120, "total": 400 | null, "epoch": 3}
    @@result {"metrics": {...}, "artifacts": {"model.safetensors": "out/model.safetensors",
              "config.json": "out/config.json"}, "input_signature": {...}, "parameters": {...}}

`@@checkpoint` comes only after the file is complete; the child never deletes a checkpoint, so
the parent removes each once uploaded. `@@progress` is printed for the first step, then at most
about once a second, and for the last step; `epoch` counts from 1. `@@result` is printed once, just
before a successful exit, with the parameters after defaults were filled (a fine-tune reports the
architecture it kept from its model). Every other line, including a malformed structured one, is
a log line. Errors go to stderr.

For predict, `@@progress` counts rows: `step` is the rows predicted so far, `total` the dataset's
row count where the format records it (Parquet) else null, `epoch` 1. There are no @@metric or
@@checkpoint lines (a stopped prediction starts again from the beginning), and the result is

    @@result {"metrics": {"rows": 1200}, "artifacts": {"predictions.csv": "out/predictions.csv"},
              "input_signature": {}, "parameters": {}}

where predictions.csv holds the input's columns except the target, in order, then the recipe's
prediction columns (classifiers: `prediction`, the class, and `probability`, its probability),
one row per input row in the input's order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, validators

import factory_job

SPEC_FILENAME = "spec.json"
LINE_PREFIX = "@@"

EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error; the traceback is on stderr
EXIT_BAD_INPUT = 2  # the parameters or the data cannot be trained on; the reason is on stderr
EXIT_STOPPED = 3  # SIGTERM or max_runtime_s; a checkpoint was printed first when there was one

TASKS = ("train", "predict", "serve", "evaluate", "export")
MAX_PROCESSES = 64  # the most GPUs a job may ask for
# Rows a streaming reader holds at once: tens of MB of Python values for a wide table.
DEFAULT_CHUNK_ROWS = 10_000


def _is_strict_integer(_checker: Any, value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# JSON Schema counts 3.0 as an integer; a parameter used as a count or size must be a real int.
StrictValidator = validators.extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)

# Printed paths are relative and never climb out of the working directory.
_RELATIVE_PATH = {"type": "string", "minLength": 1, "pattern": r"^(?!/)(?!(.*/)?\.\.(/|$))"}
_STEP = {"type": "integer", "minimum": 0}


def _object(properties: dict, required: list[str] | None = None) -> dict:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
    }


SPEC_SCHEMA = _object(
    {
        "task": {"enum": list(TASKS)},
        "recipe": {"type": "string", "minLength": 1},
        "parameters": {"type": "object"},
        "dataset": _object(
            {
                "path": {"type": "string", "minLength": 1},
                "format": {"type": "string", "minLength": 1},
                "csv_dialect": {
                    "type": ["object", "null"],
                    "properties": {
                        "delimiter": {"type": "string", "minLength": 1, "maxLength": 1},
                        "quote_char": {"type": "string", "minLength": 1, "maxLength": 1},
                        "double_quote": {"type": "boolean"},
                        "encoding": {"type": "string", "minLength": 1},
                    },
                    "additionalProperties": False,
                },
            },
            required=["path", "format"],
        ),
        "model_dir": {"type": ["string", "null"], "minLength": 1},
        "resume_from": {"type": ["string", "null"], "minLength": 1},
        "output_dir": _RELATIVE_PATH,
        "checkpoint_dir": _RELATIVE_PATH,
        "checkpoint_every_s": {"type": "number", "minimum": 0},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "max_runtime_s": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "processes": {"type": "integer", "minimum": 1, "maximum": MAX_PROCESSES},
        "chunk_rows": {"type": "integer", "minimum": 1},
        # The evaluate task's own inputs (jobs.runner.evaluate).
        "evaluate": _object(
            {
                "champion_model_dir": {"type": "string", "minLength": 1},
                "split_seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
                "slice_column": {"type": "string"},
            },
            required=["champion_model_dir", "split_seed"],
        ),
        "serve": {
            "type": ["object", "null"],
            "properties": {
                "host": {"type": "string", "minLength": 1},
                "token": {"type": "string", "minLength": 32},
                "max_items": {"type": "integer", "minimum": 1},
                "max_body_bytes": {"type": "integer", "minimum": 1},
                "drain_s": {"type": "number", "minimum": 0},
            },
            "required": ["host", "token", "max_items", "max_body_bytes", "drain_s"],
            "additionalProperties": False,
        },
    },
    required=["recipe", "parameters", "output_dir", "checkpoint_dir", "seed"],
)
SPEC_DEFAULTS = {
    "task": "train",
    "model_dir": None,
    "resume_from": None,
    "checkpoint_every_s": 300.0,
    "max_runtime_s": None,
    "processes": 1,
    "chunk_rows": DEFAULT_CHUNK_ROWS,
    "dataset": None,
    "serve": None,
}

LINE_SCHEMAS = {
    "metric": _object(
        {
            "step": _STEP,
            "name": {"type": "string", "minLength": 1},
            "value": {"type": "number"},
            "split": {"enum": ["train", "val"]},
        }
    ),
    "checkpoint": _object({"path": _RELATIVE_PATH, "step": _STEP}),
    "serving": _object({"port": {"type": "integer", "minimum": 1, "maximum": 65535}}),
    "progress": _object(
        {"step": _STEP, "total": {"type": ["integer", "null"], "minimum": 0}, "epoch": _STEP}
    ),
    "result": _object(
        {
            "metrics": {"type": "object"},
            "artifacts": {"type": "object", "additionalProperties": _RELATIVE_PATH},
            "input_signature": {"type": "object"},
            "parameters": {"type": "object"},
        }
    ),
}
_LINE_VALIDATORS = {kind: StrictValidator(schema) for kind, schema in LINE_SCHEMAS.items()}
_SPEC_VALIDATOR = StrictValidator(SPEC_SCHEMA)


class SpecError(ValueError):
    """spec.json is missing, not JSON, or does not match SPEC_SCHEMA."""


def format_line(kind: str, payload: Mapping[str, Any]) -> str:
    """The structured line for `payload`, without the newline; ValueError if it is malformed.

    NaN and infinities are refused: they are not JSON, and a metric that is not finite is a
    recipe's bug to report in words.
    """
    if kind not in _LINE_VALIDATORS:
        raise ValueError(f"Unknown line kind {kind!r}; expected one of {sorted(LINE_SCHEMAS)}.")
    error = next(_LINE_VALIDATORS[kind].iter_errors(payload), None)
    if error is not None:
        raise ValueError(f"Malformed @@{kind} payload: {error.message}")
    return factory_job.structured_line(kind, payload)


def parse_line(line: str) -> tuple[str, dict] | tuple[str, str]:
    """(kind, payload) for a well-formed structured line, else ("log", the line)."""
    line = line.rstrip("\r\n")
    if not line.startswith(LINE_PREFIX):
        return "log", line
    kind, _, text = line[len(LINE_PREFIX) :].partition(" ")
    validator = _LINE_VALIDATORS.get(kind)
    if validator is None:
        return "log", line
    try:
        payload = json.loads(text, parse_constant=_refuse_constant)
    except ValueError:
        return "log", line
    if not validator.is_valid(payload):
        return "log", line
    return kind, payload


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def write_spec(workdir: Path, spec: Mapping[str, Any]) -> Path:
    """Validate `spec` and write it as the working directory's spec.json."""
    _check_spec(dict(spec))
    path = workdir / SPEC_FILENAME
    path.write_text(json.dumps(spec, indent=2, allow_nan=False), encoding="utf-8")
    return path


def read_spec(workdir: Path) -> dict[str, Any]:
    """The working directory's spec.json with the optional keys filled; SpecError if invalid."""
    path = workdir / SPEC_FILENAME
    try:
        spec = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except OSError as exc:
        raise SpecError(f"Cannot read {path}: {exc.strerror}.") from exc
    except ValueError as exc:
        raise SpecError(f"{path} is not valid JSON: {exc}.") from exc
    _check_spec(spec)
    return SPEC_DEFAULTS | spec


def _check_spec(spec: Any) -> None:
    error = next(_SPEC_VALIDATOR.iter_errors(spec), None)
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "the spec"
        raise SpecError(f"{SPEC_FILENAME}: {where}: {error.message}")
    task = spec.get("task", "train")
    if task == "serve":
        if spec.get("model_dir") is None or spec.get("serve") is None:
            raise SpecError(f"{SPEC_FILENAME}: a serve task needs model_dir and serve.")
        if spec.get("resume_from") is not None:
            raise SpecError(f"{SPEC_FILENAME}: a serve task does not resume; resume_from is set.")
        return
    if task == "export":
        if spec.get("model_dir") is None or spec.get("resume_from") is not None:
            raise SpecError(f"{SPEC_FILENAME}: an export task needs model_dir and no resume_from.")
        return
    if spec.get("dataset") is None:
        raise SpecError(f"{SPEC_FILENAME}: the spec: 'dataset' is a required property")
    if task == "evaluate" and (spec.get("model_dir") is None or spec.get("evaluate") is None):
        raise SpecError(
            f"{SPEC_FILENAME}: an evaluate task needs model_dir (the challenger) and evaluate "
            "(the champion and the split)."
        )
    if task == "predict":
        if spec.get("model_dir") is None:
            raise SpecError(f"{SPEC_FILENAME}: a predict task needs model_dir, the model to run.")
        if spec.get("resume_from") is not None:
            raise SpecError(f"{SPEC_FILENAME}: a predict task does not resume; resume_from is set.")
