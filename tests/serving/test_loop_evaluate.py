"""The gate's evaluate job for real, for every recipe: a pool worker trains a champion that is bad
(or, for images, blind to part of a class), the policy retrains on the newest version of the data,
and the evaluate job scores both on the retrain's own validation rows, overall and per slice, on
the recipe's own metric, before the gate lets the challenger into a canary or stops it. And the
gate's judgement of an error metric, where lower is better."""

from __future__ import annotations

import csv
import io
import random
import zipfile
from pathlib import Path

import pytest
from django.utils import timezone

from jobs.models import TERMINAL_STATES, Job, JobEvent, JobState, ResourceClass
from jobs.recipes.catalog import list_recipes
from jobs.samples.images import write_image_sample
from jobs.samples.timeseries import write_timeseries_sample
from jobs.services import JobOptions, training_job_submit
from registry.services import dataset_create, dataset_version_create
from serving.gate import gate_judge
from serving.loop import loop_advance
from serving.models import (
    Deployment,
    DriftReport,
    LoopEvent,
    ModelCard,
    Retrain,
    RetrainPolicy,
    Route,
)
from serving.selectors import LIVE_METRICS
from tenants.actors import Actor
from tests.processes import wait_for

e2e = pytest.mark.django_db(transaction=True)


def _points(rows: int, *, flipped: bool, seed: int) -> bytes:
    rng = random.Random(seed)  # noqa: S311  test data, not security
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["a", "b", "colour", "label"])
    for _ in range(rows):
        a, b = rng.uniform(-1, 1), rng.uniform(-1, 1)
        positive = (a + b > 0) != flipped
        writer.writerow(
            [f"{a:.4f}", f"{b:.4f}", rng.choice(["red", "blue"]), "yes" if positive else "no"]
        )
    return out.getvalue().encode()


def _finished(job: Job) -> bool:
    job.refresh_from_db()
    return job.state in TERMINAL_STATES


def _advanced_to(deployment, state) -> bool:
    retrain = loop_advance(deployment_id=deployment.pk)
    return retrain is not None and retrain.state == state


def _retrain_evaluated(
    pool, org, owner, *, recipe: str, files: list[Path], parameters: dict, **policy
) -> tuple[Deployment, Retrain]:
    """On a pool worker: the champion trained on files[0] and deployed; drift triggers a retrain
    on the newest version (files[1]); returns once the gate's evaluate job has ended."""
    actor = Actor(user=owner)
    cpu = ResourceClass.objects.get(name="cpu")
    dataset = dataset_create(organization=org, name="data", actor=actor)
    versions = [
        dataset_version_create(dataset=dataset, path=path, filename=path.name, actor=actor)
        for path in files
    ]
    pool.start_worker("w1")
    job, _ = training_job_submit(
        organization=org,
        actor=actor,
        recipe=recipe,
        parameters=parameters,
        dataset_version=versions[0],
        options=JobOptions(resource_class=cpu, max_runtime_s=600),
        output_model_name="model",
    )
    try:
        wait_for(lambda: _finished(job), timeout=180, what="the champion's training")
        assert job.state == JobState.SUCCEEDED, job.failure_reason
        champion = job.output_model_version
        deployment = Deployment.objects.create(
            organization=org, name="model", recipe=recipe, resource_class=cpu, created_by=owner
        )
        Route.objects.create(
            organization=org, deployment=deployment, model_version=champion, weight=100
        )
        RetrainPolicy.objects.create(
            organization=org, deployment=deployment, dataset=dataset, **policy
        )
        now = timezone.now()
        DriftReport.objects.create(
            organization=org,
            deployment=deployment,
            model_version=champion,
            window_start=now,
            window_end=now,
            rows=1000,
            drifted=True,
            drifted_share=1.0,
        )
        retrain = loop_advance(deployment_id=deployment.pk)
        assert retrain.job.input_dataset_version == versions[-1]
        wait_for(lambda: _finished(retrain.job), timeout=180, what="the retrain")
        assert retrain.job.state == JobState.SUCCEEDED, retrain.job.failure_reason
        wait_for(
            lambda: _advanced_to(deployment, Retrain.State.EVALUATING),
            timeout=30,
            what="the evaluate job's submission",
        )
        retrain.refresh_from_db()
        wait_for(lambda: _finished(retrain.evaluation_job), timeout=180, what="the evaluation")
        evaluation = retrain.evaluation_job
        assert evaluation.state == JobState.SUCCEEDED, evaluation.failure_reason
    except AssertionError:
        print(pool.logs())
        raise
    assert JobEvent.objects.filter(job=evaluation, kind="evaluation").exists()
    return deployment, retrain


@e2e
def test_a_real_evaluate_job_scores_both_versions_on_held_out_rows(pool, org, owner, tmp_path):
    files = []
    for number, flipped in ((1, True), (2, False)):
        path = tmp_path / f"points-{number}.csv"
        path.write_bytes(_points(600, flipped=flipped, seed=number))
        files.append(path)
    deployment, retrain = _retrain_evaluated(
        pool,
        org,
        owner,
        recipe="tabular-classifier",
        files=files,
        parameters={"target": "label", "epochs": 4, "learning_rate": 0.05},
        slice_column="colour",
        gate_margin=0.1,
        slice_tolerance=0.05,
    )
    wait_for(lambda: _advanced_to(deployment, Retrain.State.CANARY), timeout=30, what="the gate")
    card = ModelCard.objects.get(model_version=retrain.job.output_model_version)
    metrics = card.metrics
    assert card.decision == ModelCard.Decision.PASSED, card.reasons
    # 600 rows at the default validation fraction of 0.2: 120 held out.
    assert metrics["rows"] == 120
    assert metrics["challenger"]["overall"] > 0.8 > 0.3 > metrics["champion"]["overall"]
    assert set(metrics["challenger"]["slices"]) == {"red", "blue"}
    assert card.lineage["datasets"][0]["version"] == 2
    gate = LoopEvent.objects.get(deployment=deployment, kind=LoopEvent.Kind.GATE_PASSED)
    evaluation = retrain.evaluation_job
    assert gate.job == evaluation and gate.cost_minor == evaluation.cost_minor


def _squares_mostly_called_horizontal(source: Path, target: Path) -> None:
    """The images of `source` with four squares in five moved into the horizontal folder: a
    model trained on them calls squares horizontal, and is wrong on the squares still labelled
    square."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as relabelled:
        for info in original.infolist():
            name = info.filename
            number = int(Path(name).stem.rsplit("-", 1)[1])
            if name.startswith("square/") and number % 5:
                name = f"horizontal/{Path(name).name}"
            relabelled.writestr(name, original.read(info))


@e2e
def test_an_image_challenger_worse_on_one_class_is_stopped_naming_the_class(
    pool, org, owner, tmp_path
):
    """The challenger learns that squares are mostly called horizontal: it gains overall (the
    relabelled squares), but on the images still labelled square it falls from the champion's
    near 1 to near 0, and the gate stops it there, naming the class."""
    clean, relabelled = tmp_path / "clean.zip", tmp_path / "relabelled.zip"
    write_image_sample(tmp_path / "v1.zip", per_class=60, seed=1)
    write_image_sample(clean, per_class=250, seed=2)
    _squares_mostly_called_horizontal(clean, relabelled)
    deployment, retrain = _retrain_evaluated(
        pool,
        org,
        owner,
        recipe="image-classifier",
        files=[tmp_path / "v1.zip", relabelled],
        parameters={
            "image_size": 16,
            "epochs": 5,
            "batch_size": 32,
            "width": 8,
            "learning_rate": 0.01,
            "validation_fraction": 0.3,
        },
        slice_column="class",
        gate_margin=0.05,
        slice_tolerance=0.3,
    )
    wait_for(lambda: _advanced_to(deployment, Retrain.State.REJECTED), timeout=30, what="the gate")
    card = ModelCard.objects.get(model_version=retrain.job.output_model_version)
    metrics = card.metrics
    assert card.decision == ModelCard.Decision.FAILED
    assert (metrics["metric"], metrics["higher_is_better"]) == ("accuracy", True)
    # 750 images at a validation fraction of 0.3: 225 held out, sliced by their true class.
    assert metrics["rows"] == 225
    challenger, champion = metrics["challenger"], metrics["champion"]
    assert (
        set(challenger["slices"])
        == set(champion["slices"])
        == {
            "horizontal",
            "vertical",
            "square",
        }
    )
    assert challenger["overall"] >= champion["overall"] + 0.05, card.reasons
    assert champion["slices"]["square"] - challenger["slices"]["square"] > 0.3
    assert "better by" in card.reasons[0] and ">= 0.05" in card.reasons[0]
    assert [reason.split(":")[0] for reason in card.reasons[1:]] == ["slice class=square"]
    failed = LoopEvent.objects.get(deployment=deployment, kind=LoopEvent.Kind.GATE_FAILED)
    assert "slice class=square" in failed.message
    assert set(Route.objects.filter(deployment=deployment).values_list("weight", "stage")) == {
        (100, Route.Stage.STABLE)
    }


def _stores(path: Path, *, noise: bool, seed: int) -> Path:
    """Two hourly series, north and south (three times the north's scale): the sample's daily
    cycle, or white noise about its level that teaches a model nothing about the cycle."""
    rng = random.Random(seed)  # noqa: S311  test data, not security
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["store", "timestamp", "value"])
        for name, scale in (("north", 1.0), ("south", 3.0)):
            sample = path.with_name(f"{path.stem}-{name}.csv")
            write_timeseries_sample(sample, points=24 * 15, seed=rng.randrange(1000))
            with sample.open(newline="", encoding="utf-8") as source:
                for row in csv.DictReader(source):
                    value = rng.gauss(55, 8) if noise else float(row["value"])
                    writer.writerow([name, row["timestamp"], f"{value * scale:.3f}"])
    return path


@e2e
def test_a_forecaster_with_a_lower_error_passes_the_gate_per_series(pool, org, owner, tmp_path):
    deployment, retrain = _retrain_evaluated(
        pool,
        org,
        owner,
        recipe="timeseries-forecaster",
        files=[
            _stores(tmp_path / "noise.csv", noise=True, seed=1),
            _stores(tmp_path / "stores.csv", noise=False, seed=2),
        ],
        parameters={
            "series_column": "store",
            "window": 24,
            "horizon": 6,
            "epochs": 6,
            "hidden_size": 32,
            "learning_rate": 0.005,
        },
        slice_column="series",
        gate_margin=2.0,
        slice_tolerance=1.0,
    )
    wait_for(lambda: _advanced_to(deployment, Retrain.State.CANARY), timeout=30, what="the gate")
    challenger_version = retrain.job.output_model_version
    card = ModelCard.objects.get(model_version=challenger_version)
    metrics = card.metrics
    assert card.decision == ModelCard.Decision.PASSED, card.reasons
    assert (metrics["metric"], metrics["higher_is_better"]) == ("mae", False)
    challenger, champion = metrics["challenger"], metrics["champion"]
    # The held-out windows are the ones training validated on: the same MAE it reported.
    assert metrics["rows"] == challenger_version.metrics["val_windows"]
    assert challenger["overall"] == pytest.approx(challenger_version.metrics["val_mae"])
    assert challenger["overall"] + 2.0 <= champion["overall"]
    assert set(challenger["slices"]) == set(champion["slices"]) == {"north", "south"}
    assert "mae" in card.reasons[0] and ">= 2" in card.reasons[0]


# The gate's judgement of an error metric


def _forecast_result(challenger: float, champion: float, **slices) -> dict:
    return {
        "metric": "mae",
        "higher_is_better": False,
        "slice_column": "series",
        "challenger": {"overall": challenger, "slices": {k: v[0] for k, v in slices.items()}},
        "champion": {"overall": champion, "slices": {k: v[1] for k, v in slices.items()}},
    }


@pytest.mark.parametrize(
    "challenger, passed",
    [(7.5, True), (8.0, True), (8.5, False), (10.0, False), (12.0, False)],
)
def test_a_forecaster_must_lower_the_error_by_the_margin(challenger, passed):
    """Champion MAE 10, margin 2 (in the data's units): 8 or less passes, more does not; a
    higher error never does."""
    judged, reasons = gate_judge(
        result=_forecast_result(challenger, 10.0),
        higher_is_better=False,
        margin=2.0,
        slice_tolerance=0.5,
    )
    assert judged is passed, reasons
    assert reasons[0].startswith(f"mae {challenger:.4f} vs champion 10.0000: better by")


def test_a_forecaster_slice_whose_error_rises_past_the_tolerance_fails():
    result = _forecast_result(5.0, 9.0, north=(1.0, 3.0), south=(9.0, 8.0))
    passed, reasons = gate_judge(
        result=result, higher_is_better=False, margin=2.0, slice_tolerance=1.5
    )
    assert passed, reasons  # south rose by 1, within 1.5; north fell
    passed, reasons = gate_judge(
        result=result, higher_is_better=False, margin=2.0, slice_tolerance=0.5
    )
    assert not passed
    assert reasons[1:] == [
        "slice series=south: mae 9.0000 vs champion 8.0000, worse by 1.0000 > 0.5"
    ]


def test_every_recipe_is_gated_on_the_metric_its_live_predictions_are_judged_by():
    recipes = list_recipes()
    assert set(LIVE_METRICS) <= set(recipes)
    for name, metric in LIVE_METRICS.items():
        assert recipes[name].gate_metric == metric, name
