"""The parent's side of an evaluate job (the worker, with Django): staging the champion beside
the challenger, and recording the child's evaluation as the job's `evaluation` event, which
serving's gate reads. The child's side is jobs.runner.evaluate.

The job's parameters, as serving.gate submits them: {"champion_model_version": id,
"training_parameters": {...}, "split_seed": training job id, "slice_column": str, ...}.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from jobs.models import Job
from jobs.services.events import job_event
from registry.models import ModelVersion

CHAMPION_DIR = "champion"


def evaluation_stage(job: Job, workdir: Path, download: Callable[..., None]) -> dict:
    """Download the champion's artifacts (a version of the job's own organization only) and
    return the spec keys of the evaluate task."""
    parameters = job.parameters
    champion = (
        ModelVersion.objects.for_organization(job.organization)
        .select_related("registered_model")
        .filter(pk=parameters.get("champion_model_version"))
        .first()
    )
    if champion is None:
        raise ValueError("The champion to evaluate against is not a model version of this org.")
    (workdir / CHAMPION_DIR).mkdir()
    for artifact in champion.artifacts.all():
        download(
            f"champion model {champion.registered_model.name} v{champion.number} {artifact.name}",
            key=artifact.storage_key,
            size=artifact.size_bytes,
            sha256=artifact.sha256,
            target=workdir / CHAMPION_DIR / artifact.name,
        )
    return {
        "parameters": parameters.get("training_parameters") or {},
        "evaluate": {
            "champion_model_dir": CHAMPION_DIR,
            "split_seed": int(parameters.get("split_seed") or 0),
            "slice_column": str(parameters.get("slice_column") or ""),
        },
    }


def evaluation_record(job: Job, result: dict | None) -> dict:
    """The evaluation the child printed, as the job's event; an evaluate job registers nothing."""
    evaluation = (result or {}).get("evaluation")
    if not isinstance(evaluation, dict):
        raise ValueError("The evaluation printed no result.")
    job_event(
        job=job, kind="evaluation", message="Challenger and champion scored.", data=evaluation
    )
    return {}
