"""The parent's side of an export job (the worker, with Django): the bundle the child wrote and
checked, stored as the edge bundle of the job's model version. The child's side is
jobs.runner.export."""

from __future__ import annotations

from pathlib import Path

from jobs.models import Job
from jobs.services.events import job_event
from registry.services import edge_bundle_register
from tenants.actors import Actor


def export_record(job: Job, bundle: Path, result: dict | None, actor: Actor) -> dict:
    """Register the bundle with the child's check figures; an export job makes no new version,
    so nothing goes on the job's output fields."""
    check = (result or {}).get("metrics") or {}
    stored = edge_bundle_register(
        model_version=job.input_model_version,
        path=bundle,
        self_check=check,
        actor=actor,
        source_job_id=job.pk,
    )
    job_event(
        job=job,
        kind="edge_bundle",
        message=f"Edge bundle of {job.input_model_version} stored ({stored.size_bytes} bytes).",
        data=check,
    )
    return {}
