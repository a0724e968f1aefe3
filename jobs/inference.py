"""Online prediction for small models, answered in the web process without torch.

A model version's safetensors weights are read with `safetensors.numpy` and kept in a small
in-process cache (versions are immutable, so the cache never goes stale); the recipe supplies a
numpy forward pass. Larger models, and recipes without one, use batch inference jobs.
"""

from __future__ import annotations

import functools
import importlib
import json
import tempfile
import uuid
from decimal import Decimal
from pathlib import Path

from django.utils import timezone
from safetensors.numpy import load_file

from billing.services import usage_record
from jobs.recipes.base import RecipeInputError
from registry.models import ModelVersion
from registry.storage import get_storage
from tenants.actors import Actor
from tenants.errors import DomainError

# Recipes whose models can answer single rows in the web process: name -> "module:function".
ONLINE_PREDICTORS = {"tabular-classifier": "jobs.recipes.tabular:predict_rows"}
CACHED_MODELS = 16
# Online prediction is for small models; bigger ones would not fit many to a web process.
ONLINE_MAX_WEIGHTS_BYTES = 64 * 1024 * 1024


class OnlinePredictionUnsupported(DomainError):
    code = "online_prediction_unsupported"


@functools.lru_cache(maxsize=CACHED_MODELS)
def _load(version_id: int) -> tuple[dict, dict]:
    version = ModelVersion.objects.get(pk=version_id)
    storage = get_storage()
    artifacts = {a.name: a for a in version.artifacts.all()}
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = Path(tmp) / "model.safetensors"
        with storage.open(artifacts["model.safetensors"].storage_key) as source:
            weights_path.write_bytes(source.read())
        with storage.open(artifacts["config.json"].storage_key) as source:
            config = json.loads(source.read())
        return config, load_file(str(weights_path))


def predictor_for(recipe_name: str):
    target = ONLINE_PREDICTORS.get(recipe_name)
    if target is None:
        raise OnlinePredictionUnsupported(
            f"Models of {recipe_name or 'no recipe'} are served by batch inference jobs; "
            "submit a job of kind infer instead."
        )
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def predict_online(*, version: ModelVersion, rows: list[dict], actor: Actor) -> list[dict]:
    """Predict a few rows with a cached model and meter them; bad rows are a 400 naming the row."""
    predict_rows = predictor_for(version.recipe_name)
    artifacts = {a.name: a for a in version.artifacts.all()}
    if set(artifacts) < {"model.safetensors", "config.json"}:
        raise OnlinePredictionUnsupported(f"{version} has no weights and config to serve.")
    if artifacts["model.safetensors"].size_bytes > ONLINE_MAX_WEIGHTS_BYTES:
        raise OnlinePredictionUnsupported(
            f"{version} is too large for online prediction; submit a job of kind infer instead."
        )
    try:
        config, weights = _load(version.pk)
        predictions = predict_rows(config, weights, rows)
    except RecipeInputError as exc:
        raise DomainError(str(exc), fields={"rows": [str(exc)]}) from exc
    except (KeyError, ValueError, TypeError) as exc:
        # Weights or config that do not match the recipe (e.g. registered by hand).
        raise OnlinePredictionUnsupported(
            f"{version} cannot be served online: its files do not match {version.recipe_name}."
        ) from exc
    now = timezone.now()
    usage_record(
        organization=version.organization,
        resource="predictions",
        quantity=Decimal(len(rows)) / 1000,
        unit="1k_predictions",
        period_start=now,
        period_end=now,
        idempotency_key=f"predict:{uuid.uuid4()}",
        source_type="model_version",
        source_id=str(version.pk),
        user=actor.api_key.created_by if actor.api_key else actor.user,
        api_key=actor.api_key,
        model_name=version.registered_model.name,
    )
    return predictions
