"""Edge bundles: a model version exported to ONNX (jobs.recipes.onnx_export), stored beside it."""

from __future__ import annotations

import zipfile
from pathlib import Path

from django.db import IntegrityError, transaction

from registry.errors import InvalidArtifact
from registry.models import EdgeBundle, ModelVersion
from registry.selectors import edge_bundle_get
from registry.storage import get_storage, new_object_key
from tenants.actors import Actor
from tenants.services import audit_record

from .storage_accounts import storage_charge, storage_check, stored_objects_delete

EDGE_BUNDLE_FILES = frozenset({"model.onnx", "preprocessing.json", "run.py", "README.md"})


def edge_bundle_register(
    *,
    model_version: ModelVersion,
    path: Path,
    self_check: dict,
    actor: Actor,
    source_job_id: int | None = None,
) -> EdgeBundle:
    """Store the bundle zip at `path` as `model_version`'s edge bundle. A version has one: when
    it already has it (an export retried after it registered), that one is returned and the new
    bytes are not kept."""
    existing = edge_bundle_get(model_version=model_version)
    if existing is not None:
        return existing
    try:
        with zipfile.ZipFile(path) as bundle:
            names = set(bundle.namelist())
    except zipfile.BadZipFile as exc:
        raise InvalidArtifact(f"The edge bundle is not a zip file ({exc}).") from exc
    if names != EDGE_BUNDLE_FILES:
        raise InvalidArtifact(
            f"The edge bundle holds {sorted(names)}, not {sorted(EDGE_BUNDLE_FILES)}."
        )
    organization = model_version.organization
    storage_check(organization=organization, adding_bytes=path.stat().st_size)
    key = new_object_key(
        organization_id=organization.pk,
        kind="models",
        filename=f"{model_version.registered_model.name}-v{model_version.number}-edge.zip",
    )
    with path.open("rb") as stream:
        stored = get_storage().save(key, stream, content_type="application/zip")
    try:
        return _record(
            model_version=model_version,
            stored=stored,
            self_check=self_check,
            actor=actor,
            source_job_id=source_job_id,
        )
    except IntegrityError:  # another attempt registered it meanwhile
        stored_objects_delete([stored.key])
        return edge_bundle_get(model_version=model_version)
    except BaseException:
        stored_objects_delete([stored.key])
        raise


@transaction.atomic
def _record(*, model_version, stored, self_check, actor, source_job_id) -> EdgeBundle:
    organization = model_version.organization
    bundle = EdgeBundle.objects.create(
        organization=organization,
        model_version=model_version,
        storage_key=stored.key,
        size_bytes=stored.size,
        sha256=stored.sha256,
        self_check=self_check,
        source_job_id=source_job_id,
        created_by=actor.user,
    )
    storage_charge(organization=organization, delta_bytes=stored.size)
    audit_record(
        organization=organization,
        actor=actor,
        action="model.edge_export",
        target=model_version,
        data={"bytes": stored.size, "check": self_check, "job": source_job_id},
    )
    return bundle
