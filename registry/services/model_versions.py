"""Registered models, their versions' files, and aliases guarded by promotion gates."""

from __future__ import annotations

import io
import json
import operator
from pathlib import Path

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from registry.errors import InvalidArtifact, PromotionGateFailed
from registry.models import (
    DatasetVersion,
    ModelAlias,
    ModelArtifact,
    ModelVersion,
    RegisteredModel,
)
from registry.selectors import dataset_version_require_ready
from registry.storage import get_storage, new_object_key
from registry.weights import read_safetensors_header
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError
from tenants.models import Organization
from tenants.services import audit_record
from webhooks.services import event_publish

from .datasets import validate_name
from .storage_accounts import storage_charge, storage_check, stored_objects_delete

GATE_OPERATORS = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


@transaction.atomic
def registered_model_create(
    *, organization: Organization, name: str, description: str = "", actor: Actor
) -> RegisteredModel:
    name = validate_name(name)
    if RegisteredModel.objects.for_organization(organization).filter(name=name).exists():
        raise ConflictError(
            f"A model named {name!r} already exists.", fields={"name": ["Already taken."]}
        )
    model = RegisteredModel.objects.create(
        organization=organization, name=name, description=description, created_by=actor.user
    )
    audit_record(organization=organization, actor=actor, action="model.create", target=model)
    return model


def validate_gates(gates) -> list[dict]:
    if not isinstance(gates, list):
        raise DomainError(
            "Promotion gates must be a list.", fields={"promotion_gates": ["Must be a list."]}
        )
    cleaned = []
    for i, gate in enumerate(gates):
        try:
            alias = validate_name(str(gate["alias"]), field="promotion_gates")
            metric, op, value = str(gate["metric"]), gate["op"], float(gate["value"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DomainError(
                f"Gate {i + 1} needs alias, metric, op and a numeric value.",
                fields={
                    "promotion_gates": [
                        'e.g. {"alias": "production", "metric": "accuracy", "op": ">=", '
                        '"value": 0.9}'
                    ]
                },
            ) from exc
        if op not in GATE_OPERATORS:
            raise DomainError(
                f"Gate {i + 1} has operator {op!r}; use one of {', '.join(GATE_OPERATORS)}.",
                fields={"promotion_gates": [f"Unknown operator {op!r}."]},
            )
        cleaned.append({"alias": alias, "metric": metric, "op": op, "value": value})
    return cleaned


@transaction.atomic
def registered_model_update(
    *,
    registered_model: RegisteredModel,
    actor: Actor,
    description: str | None = None,
    promotion_gates: list | None = None,
) -> RegisteredModel:
    changed = {}
    if description is not None:
        registered_model.description = description
        changed["description"] = description
    if promotion_gates is not None:
        registered_model.promotion_gates = validate_gates(promotion_gates)
        changed["promotion_gates"] = registered_model.promotion_gates
    registered_model.save(update_fields=[*changed] or None)
    audit_record(
        organization=registered_model.organization,
        actor=actor,
        action="model.update",
        target=registered_model,
        data=changed,
    )
    return registered_model


def model_version_register(
    *,
    registered_model: RegisteredModel,
    weights_path: Path,
    config: dict,
    actor: Actor,
    recipe_name: str = "",
    recipe_version: str = "",
    parameters: dict | None = None,
    metrics: dict | None = None,
    input_signature: dict | None = None,
    trained_on: list[DatasetVersion] = (),
    parent_version: ModelVersion | None = None,
    source_job_id: int | None = None,
) -> ModelVersion:
    """Store validated weights and config under the organization's prefix and record a version."""
    organization = registered_model.organization
    tensors = read_safetensors_header(weights_path)
    for linked in [*trained_on, parent_version]:
        if linked is not None and linked.organization_id != organization.pk:
            raise DomainError("Lineage can only point at this organization's own versions.")
    for dataset_version in trained_on:
        dataset_version_require_ready(dataset_version, field="trained_on")
    if not all(isinstance(v, int | float) for v in (metrics or {}).values()):
        raise InvalidArtifact(
            "Metrics must map names to numbers.", fields={"metrics": ["Numbers only."]}
        )
    config_bytes = _json_bytes(config)
    size = weights_path.stat().st_size + len(config_bytes)
    storage_check(organization=organization, adding_bytes=size)

    storage = get_storage()
    stored = {}
    try:
        for name, open_stream in (
            (WEIGHTS_NAME, lambda: weights_path.open("rb")),
            (CONFIG_NAME, lambda: io.BytesIO(config_bytes)),
        ):
            key = new_object_key(organization_id=organization.pk, kind="models", filename=name)
            with open_stream() as stream:
                stored[name] = storage.save(key, stream)
        return _record_model_version(
            registered_model=registered_model,
            stored=stored,
            actor=actor,
            recipe_name=recipe_name,
            recipe_version=recipe_version,
            parameters=parameters or {},
            metrics=metrics or {},
            input_signature=input_signature or {"tensors": tensors},
            trained_on=list(trained_on),
            parent_version=parent_version,
            source_job_id=source_job_id,
        )
    except BaseException:
        stored_objects_delete([obj.key for obj in stored.values()])
        raise


def _json_bytes(config: dict) -> bytes:
    return json.dumps(config, sort_keys=True).encode()


@transaction.atomic
def _record_model_version(*, registered_model, stored, actor, trained_on, **fields) -> ModelVersion:
    registered_model = RegisteredModel.objects.select_for_update().get(pk=registered_model.pk)
    number = (registered_model.versions.aggregate(n=Max("number"))["n"] or 0) + 1
    version = ModelVersion.objects.create(
        organization=registered_model.organization,
        registered_model=registered_model,
        number=number,
        created_by=actor.user,
        **fields,
    )
    version.trained_on.set(trained_on)
    ModelArtifact.objects.bulk_create(
        ModelArtifact(
            organization=registered_model.organization,
            model_version=version,
            name=name,
            storage_key=obj.key,
            size_bytes=obj.size,
            sha256=obj.sha256,
        )
        for name, obj in stored.items()
    )
    storage_charge(
        organization=registered_model.organization,
        delta_bytes=sum(obj.size for obj in stored.values()),
    )
    audit_record(
        organization=registered_model.organization,
        actor=actor,
        action="model.version_register",
        target=version,
        data={"metrics": version.metrics, "trained_on": [str(v) for v in trained_on]},
    )
    event_publish(
        organization=registered_model.organization,
        type="model.version_created",
        data={
            "model": {"id": registered_model.pk, "name": registered_model.name},
            "version": {
                "id": version.pk,
                "number": version.number,
                "recipe": version.recipe_name,
                "metrics": version.metrics,
                "source_job_id": version.source_job_id,
                "trained_on": [{"id": v.pk, "name": str(v)} for v in trained_on],
                "created_at": version.created_at.isoformat(),
            },
        },
    )
    return version


def _check_gates(registered_model: RegisteredModel, alias: str, version: ModelVersion) -> None:
    for gate in registered_model.promotion_gates:
        if gate["alias"] != alias:
            continue
        value = version.metrics.get(gate["metric"])
        rule = f"{gate['metric']} {gate['op']} {gate['value']:g}"
        if value is None:
            raise PromotionGateFailed(
                f"{alias} requires {rule}, but v{version.number} has no {gate['metric']} metric."
            )
        if not GATE_OPERATORS[gate["op"]](value, gate["value"]):
            raise PromotionGateFailed(
                f"{alias} requires {rule}; v{version.number} has {gate['metric']} = {value:g}. "
                "Train a better version or change the gate."
            )


@transaction.atomic
def model_alias_set(
    *, registered_model: RegisteredModel, alias: str, version: ModelVersion, actor: Actor
) -> ModelAlias:
    """Point an alias at a version (needs `models:promote`, checked by the caller's scope)."""
    alias = validate_name(alias, field="alias")
    if version.registered_model_id != registered_model.pk:
        raise DomainError(f"v{version.number} belongs to another model.")
    registered_model = RegisteredModel.objects.select_for_update().get(pk=registered_model.pk)
    _check_gates(registered_model, alias, version)
    current = ModelAlias.objects.filter(registered_model=registered_model, name=alias).first()
    previous = current.version.number if current else None
    if current is None:
        current = ModelAlias(
            organization=registered_model.organization,
            registered_model=registered_model,
            name=alias,
        )
    current.version, current.updated_by, current.updated_at = version, actor.user, timezone.now()
    current.save()
    audit_record(
        organization=registered_model.organization,
        actor=actor,
        action="model.alias_set",
        target=current,
        data={
            "model": registered_model.name,
            "alias": alias,
            "from": previous,
            "to": version.number,
        },
    )
    _alias_moved_publish(
        registered_model=registered_model, alias=alias, previous=previous, version=version
    )
    return current


def _alias_moved_publish(
    *,
    registered_model: RegisteredModel,
    alias: str,
    previous: int | None,
    version: ModelVersion | None,
) -> None:
    """Owe `model.alias_moved` (to a version, or to none when the alias is removed)."""
    event_publish(
        organization=registered_model.organization,
        type="model.alias_moved",
        data={
            "model": {"id": registered_model.pk, "name": registered_model.name},
            "alias": alias,
            "from_version": previous,
            "to_version": version.number if version else None,
            "to_version_id": version.pk if version else None,
        },
    )


@transaction.atomic
def model_alias_delete(*, alias: ModelAlias, actor: Actor) -> None:
    audit_record(
        organization=alias.organization,
        actor=actor,
        action="model.alias_delete",
        target=alias,
        data={
            "model": alias.registered_model.name,
            "alias": alias.name,
            "was": alias.version.number,
        },
    )
    _alias_moved_publish(
        registered_model=alias.registered_model,
        alias=alias.name,
        previous=alias.version.number,
        version=None,
    )
    alias.delete()
