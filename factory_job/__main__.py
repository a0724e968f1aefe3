"""`python -m factory_job`: run the package's entry point inside the sandbox.

The parent starts this as the sandbox's command, with the code on PYTHONPATH and the job's
description at $FACTORY_JOB_SPEC. Its `task` says what to run:

- "train": import the train entry ("module:function"), call it with no arguments, and once it
  returns print the one @@result line the parent registers outputs from;
- "predict": a batch inference job. Load the predict entry's function with the model's folder,
  feed it the rows the parent wrote (one JSON object per line) chunk by chunk, write what it
  returns to output/predictions.csv, and print @@result naming that file as the dataset;
- "serve": a replica. Load the same function, say `{"ready": true}` on the channel the parent
  passed (factory_job.channel), then answer each request frame until the parent closes it.

Started with --warm, it is a sandbox started ahead of its job: it imports what the runtime
offers that jobs often use (WARM_IMPORTS, each only if it imports), then waits for the parent's
"go" (factory_job.GO_FD_ENV); its job file and the package's files exist only from then on. The
descriptor closed without a "go" (the parent discarded it) ends it without running anything.

Exit codes are those of jobs.runner.protocol: a stop request that the entry honoured is
EXIT_STOPPED (no result: the job resumes from its last checkpoint), BadInput is EXIT_BAD_INPUT.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import factory_job
from factory_job import channel

PREDICTIONS = "predictions.csv"
# Imported by a sandbox started ahead of its job, when the runtime has them: the slow imports of
# a typical job, none of which holds anything of a tenant's.
WARM_IMPORTS = ("numpy", "torch")
# What a replica accepts from the parent in one frame (the parent bounds requests far below it).
MAX_REQUEST_BYTES = 64 * 1024 * 1024


def main() -> int:
    # Only raises the flag: the entry checkpoints and returns when it next asks should_stop().
    signal.signal(signal.SIGTERM, lambda _signum, _frame: factory_job._stop.set())
    sys.stdout.reconfigure(line_buffering=True)
    job = factory_job._job()
    task = job.get("task", "train")
    try:
        function = _entry(job["entry"])
        if task == "train":
            function()
        elif task == "predict":
            _predict_rows(_predictor(function), job)
        else:
            return _serve(_predictor(function))
    except factory_job.BadInput as exc:
        print(str(exc), file=sys.stderr)
        return factory_job.EXIT_BAD_INPUT
    except Exception:
        traceback.print_exc()
        return factory_job.EXIT_FAILED
    if factory_job.should_stop():
        return factory_job.EXIT_STOPPED
    factory_job._out.result(**factory_job._result())
    return factory_job.EXIT_OK


def _entry(entry: str) -> Callable:
    module_name, _, function_name = entry.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def _predictor(load: Callable) -> Callable[[list], list]:
    predict = load(factory_job.inputs()["model"])
    if not callable(predict):
        raise TypeError(
            f"The predict entry returned {type(predict).__name__}, not the function that answers "
            "(a list of inputs in, a list of outputs out)."
        )

    def checked(inputs: list) -> list:
        outputs = predict(inputs)
        if not isinstance(outputs, list) or len(outputs) != len(inputs):
            got = f"{len(outputs)} outputs" if isinstance(outputs, list) else type(outputs).__name__
            raise TypeError(
                f"predict returned {got} for {len(inputs)} inputs; it returns a list, "
                "one output per input."
            )
        return outputs

    return checked


def _chunks(path: Path, size: int) -> Iterator[list]:
    chunk: list = []
    with path.open(encoding="utf-8") as rows:
        for line in rows:
            chunk.append(json.loads(line))
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _predict_rows(predict: Callable[[list], list], job: dict) -> None:
    """Predict every row, writing the CSV as it goes; a stop request leaves no result."""
    total, done = job["rows"], 0
    path = factory_job._work() / job["output_dir"] / PREDICTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: list[str] | None = None
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        for inputs in _chunks(Path(factory_job.inputs()["rows"]), job["chunk_rows"]):
            if factory_job.should_stop():
                return
            outputs = json.loads(channel.dumps(predict(inputs)))
            if columns is None:
                columns = list(outputs[0]) if isinstance(outputs[0], dict) else ["prediction"]
                writer.writerow(["row", *columns])
            for offset, output in enumerate(outputs):
                writer.writerow([done + offset + 1, *_cells(output, columns, done + offset)])
            done += len(inputs)
            factory_job.progress(done, total)
    factory_job._last_metrics["rows"] = done
    factory_job._artifacts["dataset"] = path.relative_to(factory_job._work()).as_posix()


def _cells(output, columns: list[str], index: int) -> list:
    if not isinstance(output, dict):
        output = {"prediction": output}
    extra = set(output) - set(columns)
    if extra:
        raise TypeError(
            f"Output {index} has {sorted(extra)[0]!r}, which the first output did not; every "
            "output of a batch has the same keys (they are the CSV's columns)."
        )
    return [_cell(output.get(column)) for column in columns]


def _cell(value) -> object:
    if value is None:
        return ""
    if isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, allow_nan=False)


def _serve(predict: Callable[[list], list]) -> int:
    """Answer the parent's frames until it closes the channel (its stop), then EXIT_STOPPED."""
    link = socket.socket(fileno=int(os.environ[channel.FD_ENV]))
    channel.send(link, {"ready": True})
    while (request := channel.receive(link, max_bytes=MAX_REQUEST_BYTES)) is not None:
        try:
            answer = {"outputs": predict(request["inputs"])}
        except factory_job.BadInput as exc:
            answer = {"error": str(exc), "bad_input": True}
        except Exception:
            traceback.print_exc()
            answer = {"error": "The model failed on this request.", "bad_input": False}
        try:
            channel.send(link, answer)
        except (ValueError, TypeError):  # an output that is not JSON (NaN, an object)
            traceback.print_exc()
            channel.send(link, {"error": "The model's output is not JSON.", "bad_input": False})
    return factory_job.EXIT_STOPPED


def _wait_for_go() -> bool:
    """Import ahead, then wait for the parent's go; False when it discarded this sandbox."""
    for module in WARM_IMPORTS:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: S112 - absent or broken: the job's own import says why
            continue
    with open(int(os.environ.pop(factory_job.GO_FD_ENV)), "rb") as go:
        said = go.readline()
    if said != factory_job.GO:
        return False
    # The package's files arrived after the import system last listed /code.
    importlib.invalidate_caches()
    del sys.argv[1:]
    return True


if __name__ == "__main__":
    if factory_job.WARM_FLAG in sys.argv[1:] and not _wait_for_go():
        sys.exit(factory_job.EXIT_STOPPED)
    sys.exit(main())
