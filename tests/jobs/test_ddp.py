"""Data-parallel training through the job's child: two CPU processes joined by gloo train one
model, print each line once, stop together on SIGTERM with a checkpoint from rank 0, and resume
from it to the very weights of an uninterrupted run."""

import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.recipes.base import RecipeContext, RecipeInputError, load_checkpoint, validate_parameters
from jobs.recipes.tabular import TabularClassifier
from jobs.runner import child
from jobs.runner.protocol import EXIT_OK, EXIT_STOPPED, write_spec
from jobs.samples import write_tabular_sample
from tests.jobs.recipe_helpers import ChildRun
from tests.jobs.recipe_helpers import run_child as run_child_process

REPO = Path(__file__).resolve().parents[2]
CHILD_ENV = os.environ | {"OMP_NUM_THREADS": "1"}
CHILD_TIMEOUT_S = 60
# 600 rows: 480 to train, 240 per rank, 15 steps of 16 rows an epoch on each.
PARAMETERS = {
    "target": "label",
    "epochs": 10,
    "batch_size": 16,
    "hidden_sizes": [16],
    "learning_rate": 0.01,
    "early_stopping_patience": 0,
}
STEPS = 10 * 15


def run_child(workdir: Path, on_line=None, **spec) -> ChildRun:
    """Train with two processes in `workdir` (which holds data.csv) to the end, handing each
    parsed stdout line to `on_line(process, line)`."""
    write_spec(
        workdir,
        {
            "recipe": "tabular-classifier",
            "parameters": PARAMETERS,
            "dataset": {"path": "data.csv", "format": "csv"},
            "output_dir": "out",
            "checkpoint_dir": "checkpoints",
            "checkpoint_every_s": 3600,
            "seed": 5,
            "processes": 2,
        }
        | spec,
    )
    return run_child_process(workdir, on_line)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "data.csv"
    write_tabular_sample(path, rows=600, seed=0)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset) -> tuple[Path, ChildRun]:
    workdir = tmp_path_factory.mktemp("whole")
    (workdir / "data.csv").write_bytes(dataset.read_bytes())
    return workdir, run_child(workdir)


def test_two_processes_train_one_model_and_only_rank_0_speaks(uninterrupted, dataset):
    workdir, run = uninterrupted

    assert run.returncode == EXIT_OK, run.stderr
    assert "Traceback" not in run.stderr
    [result] = run.of("result")
    assert run.structured()[-1] == ("result", result)
    assert result["metrics"]["val_accuracy"] > 0.9
    assert result["parameters"] == validate_parameters(TabularClassifier, PARAMETERS)
    # Each rank trains on half the rows: 15 steps an epoch, not 30; each line comes once.
    steps = [progress["step"] for progress in run.of("progress")]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == STEPS
    assert run.of("progress")[-1]["total"] == STEPS
    metrics = [(m["step"], m["split"], m["name"]) for m in run.of("metric")]
    assert len(metrics) == len(set(metrics)) == 10 * 5
    assert sum("Training on 480 rows" in line for kind, line in run.lines if kind == "log") == 1

    model_dir = workdir / "out"
    assert set(load_file(model_dir / "model.safetensors")) >= {"mlp.0.weight", "mlp.2.bias"}
    ctx = RecipeContext(
        workdir=workdir,
        dataset_path=dataset,
        dataset_format="csv",
        parameters=validate_parameters(TabularClassifier, PARAMETERS),
        seed=0,
        output_dir=workdir / "unused",
        checkpoint_dir=workdir / "unused",
        model_dir=model_dir,
        devices=["cpu"],
    )
    assert TabularClassifier().evaluate(ctx)["accuracy"] > 0.9


@pytest.mark.slow
def test_sigterm_stops_every_rank_with_a_checkpoint_that_resumes_exactly(
    tmp_path, uninterrupted, dataset
):
    (tmp_path / "data.csv").write_bytes(dataset.read_bytes())

    def stop_at_first_progress(process, line):
        if line[0] == "progress" and line[1]["step"] == 1:
            process.send_signal(signal.SIGTERM)

    # A checkpoint after every step keeps the run going until the signal lands.
    stopped = run_child(tmp_path, on_line=stop_at_first_progress, checkpoint_every_s=0)

    assert stopped.returncode == EXIT_STOPPED, stopped.stderr
    kind, checkpoint = stopped.structured()[-1]
    assert kind == "checkpoint"
    assert 1 <= checkpoint["step"] < STEPS
    assert not stopped.of("result")
    steps = {c["step"] for c in stopped.of("checkpoint")}
    assert sorted(steps) == list(range(1, checkpoint["step"] + 1))
    assert len(list((tmp_path / "checkpoints").iterdir())) == len(steps)  # no partial files

    state = load_checkpoint(tmp_path / checkpoint["path"])
    one_process = RecipeContext(
        workdir=tmp_path,
        dataset_path=tmp_path / "data.csv",
        dataset_format="csv",
        parameters=validate_parameters(TabularClassifier, PARAMETERS),
        seed=5,
        output_dir=tmp_path / "one",
        checkpoint_dir=tmp_path / "one",
        resume_state=state,
        devices=["cpu"],
        emit=lambda _line: None,
    )
    with pytest.raises(RecipeInputError, match="checkpoint belongs to a run with other"):
        TabularClassifier().train(one_process)

    resumed = run_child(tmp_path, resume_from=checkpoint["path"])

    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert resumed.of("progress")[0]["step"] == checkpoint["step"] + 1
    whole_dir, whole = uninterrupted
    assert resumed.of("result")[0]["metrics"] == whole.of("result")[0]["metrics"]
    expected = load_file(whole_dir / "out" / "model.safetensors")
    actual = load_file(tmp_path / "out" / "model.safetensors")
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_a_recipe_that_trains_on_one_device_refuses_several(tmp_path, monkeypatch, dataset):
    class OneDevice(TabularClassifier):
        distributed = False

    monkeypatch.setattr(child, "get_recipe", lambda _name: OneDevice)
    write_spec(
        tmp_path,
        {
            "recipe": "one-device",
            "parameters": PARAMETERS,
            "dataset": {"path": str(dataset), "format": "csv"},
            "output_dir": "out",
            "checkpoint_dir": "checkpoints",
            "seed": 5,
            "processes": 2,
        },
    )
    with pytest.raises(RecipeInputError, match="trains on one device; ask for 1 GPU, not 2"):
        child._run(tmp_path, threading.Event())


def test_a_rank_that_crashes_after_its_task_returned_keeps_the_tasks_result(capsys):
    # gloo has aborted a rank while it left the process group, after every rank had agreed to
    # stop and rank 0 had written the checkpoint: the job stopped, it did not fail.
    assert child._rank_outcome(1, -signal.SIGABRT, EXIT_STOPPED) == EXIT_STOPPED
    assert "Rank 1 ended with signal 6 after its task returned 3." in capsys.readouterr().err

    # Before the task returned, the crash is the rank's outcome.
    assert child._rank_outcome(1, -signal.SIGABRT, child.NOT_FINISHED) == -signal.SIGABRT
    assert child._rank_outcome(0, EXIT_OK, EXIT_OK) == EXIT_OK
    assert capsys.readouterr().err == ""
