"""The job's child process as the GPU worker runs it: a real `python -m jobs.runner.child`
subprocess, read line by line through the protocol, plus the protocol's own edge cases."""

import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from safetensors.torch import load_file

from jobs.runner.protocol import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    SpecError,
    format_line,
    parse_line,
    read_spec,
    write_spec,
)
from tests.jobs.recipe_helpers import run_child

REPO = Path(__file__).resolve().parents[2]
# These models are tiny: more threads only contend for a shared machine's cores.
CHILD_ENV = os.environ | {"OMP_NUM_THREADS": "1"}
CHILD_TIMEOUT_S = 60


def make_workdir(workdir: Path, parameters: dict | None = None, **spec) -> Path:
    """A working directory as the worker prepares it: a CSV whose label follows x1 and the
    color, and spec.json."""
    rng = random.Random(0)  # noqa: S311 (seeded test data)
    lines = ["x1,color,label"]
    for _ in range(200):
        x1, color = round(rng.uniform(-1, 1), 3), rng.choice(["red", "blue"])
        label = "yes" if x1 + (0.5 if color == "red" else -0.5) > 0 else "no"
        lines.append(f"{x1},{color},{label}")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_spec(
        workdir,
        {
            "recipe": "tabular-classifier",
            "parameters": {"target": "label", "epochs": 3, "learning_rate": 0.05}
            if parameters is None
            else parameters,
            "dataset": {"path": "data.csv", "format": "csv"},
            "resume_from": None,
            "output_dir": "out",
            "checkpoint_dir": "checkpoints",
            "checkpoint_every_s": 3600,
            "seed": 3,
            "max_runtime_s": None,
        }
        | spec,
    )
    return workdir


@pytest.mark.slow
def test_child_trains_and_reports_metrics_checkpoints_and_result(tmp_path):
    workdir = make_workdir(tmp_path, checkpoint_every_s=0)
    run = run_child(workdir)

    assert run.returncode == EXIT_OK, run.stderr
    assert "Traceback" not in run.stderr
    assert {(m["split"], m["name"]) for m in run.of("metric")} >= {
        ("train", "loss"),
        ("val", "accuracy"),
    }
    # 160 training rows in batches of 64: 3 steps an epoch, 9 in all, each one checkpointed.
    checkpoints = run.of("checkpoint")
    assert [c["step"] for c in checkpoints] == list(range(1, 10))
    assert all((workdir / c["path"]).is_file() for c in checkpoints)
    assert run.of("progress")[0] == {"step": 1, "total": 9, "epoch": 1}
    kind, result = run.structured()[-1]
    assert kind == "result"
    assert result["metrics"]["val_accuracy"] >= 0.8
    assert result["parameters"]["batch_size"] == 64  # defaults are filled in
    assert load_file(workdir / result["artifacts"]["model.safetensors"])
    assert (workdir / result["artifacts"]["config.json"]).is_file()
    assert result["input_signature"]["classes"] == ["no", "yes"]


@pytest.mark.slow
def test_sigterm_checkpoints_and_stops_then_the_checkpoint_resumes_to_the_end(tmp_path):
    # 160 training rows in batches of 8 for 25 epochs: 500 steps, each one checkpointed, so the
    # run is still going when the signal lands.
    parameters = {
        "target": "label",
        "epochs": 25,
        "batch_size": 8,
        "hidden_sizes": [8],
        "early_stopping_patience": 0,
    }
    workdir = make_workdir(tmp_path, parameters, checkpoint_every_s=0)

    def stop_at_first_progress(process, line):
        if line[0] == "progress" and line[1]["step"] == 1:
            process.send_signal(signal.SIGTERM)

    stopped = run_child(workdir, on_line=stop_at_first_progress)

    assert stopped.returncode == EXIT_STOPPED, stopped.stderr
    kind, checkpoint = stopped.structured()[-1]
    assert kind == "checkpoint"
    assert 1 <= checkpoint["step"] < 500
    assert not stopped.of("result")

    make_workdir(workdir, parameters, resume_from=checkpoint["path"])
    resumed = run_child(workdir)

    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert resumed.of("progress")[0]["step"] == checkpoint["step"] + 1
    assert resumed.of("progress")[-1] == {"step": 500, "total": 500, "epoch": 25}
    assert resumed.of("result")[0]["metrics"]["epochs_trained"] == 25


@pytest.mark.parametrize(
    ("spec", "reasons"),
    [
        (
            {"parameters": {"target": "label", "epochs": "many", "colour": "red"}},
            ["parameters.epochs: Must be a whole number.", "parameters.colour: Unknown parameter"],
        ),
        ({"recipe": "nope"}, ["There is no recipe named 'nope'."]),
        ({"dataset": {"path": "data.csv", "format": "npz"}}, ["trains on csv, parquet"]),
    ],
)
@pytest.mark.slow
def test_bad_requests_exit_2_with_the_reason_on_stderr(tmp_path, spec, reasons):
    run = run_child(make_workdir(tmp_path, **spec))
    assert run.returncode == EXIT_BAD_INPUT
    assert not run.structured()
    for reason in reasons:
        assert reason in run.stderr


@pytest.mark.slow
def test_an_invalid_spec_is_the_platform_failing(tmp_path):
    (tmp_path / "spec.json").write_text('{"recipe": "tabular-classifier"}')
    run = run_child(tmp_path)
    assert run.returncode == EXIT_FAILED
    assert "'parameters' is a required property" in run.stderr


@pytest.mark.slow
def test_child_fine_tunes_only_a_dataset_shaped_like_the_model(tmp_path):
    parameters = {"target": "label", "epochs": 2, "learning_rate": 0.05, "hidden_sizes": [8]}
    trained = run_child(make_workdir(tmp_path / "first", parameters))
    assert trained.returncode == EXIT_OK, trained.stderr

    workdir = make_workdir(tmp_path / "second", parameters, model_dir=str(tmp_path / "first/out"))
    data = workdir / "data.csv"
    lines = data.read_text().splitlines()
    data.write_text("\n".join([lines[0] + ",shop"] + [f"{line},web" for line in lines[1:]]))
    refused = run_child(workdir)

    assert refused.returncode == EXIT_BAD_INPUT
    assert "it has columns the model lacks: 'shop'" in refused.stderr
    assert not refused.structured()


def test_spec_fills_the_optional_keys(tmp_path):
    make_workdir(tmp_path)
    spec = read_spec(tmp_path)
    assert {key: spec[key] for key in ("task", "model_dir", "processes", "chunk_rows")} == {
        "task": "train",
        "model_dir": None,
        "processes": 1,
        "chunk_rows": 10_000,
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"task": "dance"},
            "task: 'dance' is not one of ['train', 'predict', 'serve', 'evaluate', 'export']",
        ),
        ({"task": "evaluate", "model_dir": "model"}, "an evaluate task needs model_dir"),
        ({"processes": 0}, "processes: 0 is less than the minimum of 1"),
        ({"task": "predict", "parameters": {}}, "a predict task needs model_dir"),
        (
            {"task": "predict", "parameters": {}, "model_dir": "m", "resume_from": "c.pt"},
            "a predict task does not resume",
        ),
        ({"task": "serve", "parameters": {}, "model_dir": "m"}, "a serve task needs model_dir"),
        ({"task": "export", "parameters": {}}, "an export task needs model_dir"),
    ],
)
def test_spec_refuses_what_the_child_cannot_run(tmp_path, spec, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        make_workdir(tmp_path, **spec)


@pytest.mark.slow
def test_the_child_dies_with_its_parent():
    """A worker that dies must not leave its child holding a GPU: the child asks Linux for
    SIGKILL when its parent goes. Here the parent exits as soon as the child is armed; the
    child would otherwise wait on stdin for ever."""
    child = (
        "import os, sys; from jobs.runner.isolation import die_with_parent; die_with_parent(); "
        "print(os.getpid(), flush=True); sys.stdin.read()"
    )
    parent = (
        "import subprocess, sys; "
        f"child = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE); "
        "print(child.stdout.readline().decode().strip(), flush=True)"
    )
    # The child inherits the parent's stderr, so that pipe reaches EOF only when both are gone.
    process = subprocess.Popen(
        [sys.executable, "-c", parent],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    child_pid = int(process.stdout.readline())
    rescued = threading.Event()

    def rescue() -> None:
        rescued.set()
        os.kill(child_pid, signal.SIGKILL)

    timer = threading.Timer(10, rescue)
    timer.start()
    try:
        process.stderr.read()
        assert process.wait() == 0
    finally:
        timer.cancel()
        process.stdin.close()
        process.stdout.close()
        process.stderr.close()
    assert not rescued.is_set(), "the child outlived its parent"


# The line protocol


def test_structured_lines_round_trip():
    payload = {"step": 3, "name": "loss", "value": 0.25, "split": "val"}
    line = format_line("metric", payload)
    assert line == '@@metric {"step":3,"name":"loss","value":0.25,"split":"val"}'
    assert parse_line(line + "\n") == ("metric", payload)
    assert parse_line('@@progress {"step": 1, "total": null, "epoch": 1}') == (
        "progress",
        {"step": 1, "total": None, "epoch": 1},
    )


@pytest.mark.parametrize(
    "line",
    [
        "plain text",
        "@@metric",
        "@@metric not json",
        "@@metric [1, 2]",
        '@@shout {"step": 1}',
        '@@metric {"step": 1, "name": "loss", "value": NaN, "split": "val"}',
        '@@metric {"step": 1, "name": "loss", "value": "0.5", "split": "val"}',
        '@@metric {"step": 1.0, "name": "loss", "value": 0.5, "split": "val"}',
        '@@metric {"step": 1, "name": "loss", "value": 0.5, "split": "test"}',
        '@@checkpoint {"path": "/etc/passwd", "step": 1}',
        '@@checkpoint {"path": "checkpoints/../../x.pt", "step": 1}',
        '@@progress {"step": 1, "epoch": 1}',
    ],
)
def test_anything_but_a_well_formed_structured_line_is_a_log_line(line):
    assert parse_line(line + "\n") == ("log", line)


@pytest.mark.parametrize(
    ("kind", "payload"),
    [
        ("metric", {"step": 1, "name": "loss", "value": math.nan, "split": "train"}),
        ("metric", {"step": 1, "name": "loss", "value": 0.1}),
        ("checkpoint", {"path": "../outside.pt", "step": 1}),
        ("gossip", {}),
    ],
)
def test_format_line_refuses_what_parse_line_would_not_accept(kind, payload):
    with pytest.raises(ValueError, match=r"Malformed|Unknown line kind|not JSON compliant"):
        format_line(kind, payload)
