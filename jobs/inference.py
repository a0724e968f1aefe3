"""Online prediction for small models, answered in the web process without torch.

A model version's safetensors weights are read with `safetensors.numpy` and kept in a
least-recently-used cache of ONLINE_PREDICTION_CACHE_BYTES per process (versions are immutable, so
it never goes stale); a model over ONLINE_PREDICTION_MAX_MODEL_BYTES is refused before it is
read. The recipe supplies a numpy forward pass. Larger models, and recipes without one, use batch
inference jobs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from django.conf import settings
from django.utils import timezone
from safetensors.numpy import load_file

from billing.selectors import usage_latest_keyed
from billing.services import usage_record
from jobs.recipes.base import RecipeInputError
from registry.models import ModelVersion
from registry.storage import ObjectMismatch, get_storage
from tenants.actors import Actor
from tenants.errors import DomainError

# Recipes whose models can answer single rows in the web process: name -> "module:function".
ONLINE_PREDICTORS = {"tabular-classifier": "jobs.recipes.tabular:predict_rows"}
IDEMPOTENCY_KEY_MAX = 200

Model = tuple[dict, dict]  # config.json, and the weights by tensor name


class OnlinePredictionUnsupported(DomainError):
    code = "online_prediction_unsupported"


class ModelTooLarge(DomainError):
    code = "model_too_large"


class ModelFilesChanged(DomainError):
    """The stored files no longer match the sizes and checksums registered with the version."""

    code = "model_files_changed"
    status = 409


class ModelCache:
    """Loaded models, least recently used out first, holding at most `budget` bytes of weights.

    Counted in bytes, not entries: one tenant's large model must not push a process's memory
    past what the next sixteen small ones would.
    """

    def __init__(self):
        self._entries: OrderedDict[Hashable, tuple[int, Model]] = OrderedDict()
        self._lock = threading.Lock()
        self.resident_bytes = 0

    def get(self, key: Hashable, load: Callable[[], Model], *, budget: int) -> Model:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][1]
        model = load()  # outside the lock: it reads from storage
        size = sum(array.nbytes for array in model[1].values())
        if size > budget:
            return model  # served once, never kept
        with self._lock:
            if key in self._entries:  # another thread loaded it meanwhile
                self._entries.move_to_end(key)
                return self._entries[key][1]
            while self._entries and self.resident_bytes + size > budget:
                _key, (evicted, _model) = self._entries.popitem(last=False)
                self.resident_bytes -= evicted
            self._entries[key] = (size, model)
            self.resident_bytes += size
        return model

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.resident_bytes = 0


model_cache = ModelCache()


def _load(version_id: int) -> Model:
    """Read a version's config and weights, refusing bytes other than those registered (as the
    workers do for their inputs)."""
    version = ModelVersion.objects.get(pk=version_id)
    storage = get_storage()
    artifacts = {a.name: a for a in version.artifacts.all()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: Path(tmp) / name for name in ("model.safetensors", "config.json")}
        for name, path in paths.items():
            artifact = artifacts[name]
            try:
                storage.download_verified(
                    artifact.storage_key, path, size=artifact.size_bytes, sha256=artifact.sha256
                )
            except ObjectMismatch as exc:
                raise ModelFilesChanged(
                    f"{version}'s {name} no longer matches its registered {exc.field}; it was not "
                    "served. Register the model again."
                ) from exc
        config = json.loads(paths["config.json"].read_text())
        return config, load_file(str(paths["model.safetensors"]))


def predictor_for(recipe_name: str):
    target = ONLINE_PREDICTORS.get(recipe_name)
    if target is None:
        raise OnlinePredictionUnsupported(
            f"Models of {recipe_name or 'no recipe'} are served by batch inference jobs; "
            "submit a job of kind infer instead."
        )
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _ledger_key(*, organization, request: dict, idempotency_key: str | None, now: datetime) -> str:
    """The ledger row's key. A client's retry (same key, same request) within
    IDEMPOTENCY_WINDOW_S of the first request finds that request's row; after the window the
    same request is a new prediction, as at Stripe, else a fixed key would make a monitor's
    repeated row free forever. The key reused for another request is another prediction.

    Each window's row is `<request>:<n>`, n counting the windows, so that concurrent repeats
    compute the same next key and the ledger's unique key keeps one of them.
    """
    if not idempotency_key:
        return f"predict:{uuid.uuid4()}"
    fingerprint = json.dumps({"key": idempotency_key, **request}, sort_keys=True, default=str)
    chain = f"predict:{organization.pk}:{hashlib.sha256(fingerprint.encode()).hexdigest()}"
    latest = usage_latest_keyed(organization=organization, key_prefix=f"{chain}:")
    if latest is None:
        return f"{chain}:1"
    if now - latest.created_at < timedelta(seconds=settings.IDEMPOTENCY_WINDOW_S):
        return latest.idempotency_key
    return f"{chain}:{int(latest.idempotency_key.rpartition(':')[2]) + 1}"


def idempotency_key_check(idempotency_key: str | None) -> None:
    if idempotency_key and len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
        raise DomainError(
            "The Idempotency-Key header is too long.",
            fields={"idempotency_key": [f"At most {IDEMPOTENCY_KEY_MAX} characters, e.g. a UUID."]},
        )


def predictions_meter(
    *,
    version: ModelVersion,
    count: int,
    request: dict,
    actor: Actor,
    idempotency_key: str | None = None,
    source_type: str = "model_version",
    source_id: str = "",
) -> bool:
    """Bill `count` predictions per 1,000, once per idempotency key and `request` (what makes
    two calls the same: the version or deployment and the rows) within IDEMPOTENCY_WINDOW_S.
    Shared by online prediction here and by deployments (serving/); True when newly billed."""
    now = timezone.now()
    _row, created = usage_record(
        organization=version.organization,
        resource="predictions",
        quantity=Decimal(count) / 1000,
        unit="1k_predictions",
        period_start=now,
        period_end=now,
        idempotency_key=_ledger_key(
            organization=version.organization,
            request=request,
            idempotency_key=idempotency_key,
            now=now,
        ),
        source_type=source_type,
        source_id=source_id or str(version.pk),
        user=actor.api_key.created_by if actor.api_key else actor.user,
        api_key=actor.api_key,
        model_name=version.registered_model.name,
    )
    return created


def predict_online(
    *,
    version: ModelVersion,
    rows: list[dict],
    actor: Actor,
    idempotency_key: str | None = None,
) -> list[dict]:
    """Predict a few rows with a cached model and meter them once per idempotency key; bad rows
    are a 400 naming the row."""
    idempotency_key_check(idempotency_key)
    predict_rows = predictor_for(version.recipe_name)
    artifacts = {a.name: a for a in version.artifacts.all()}
    if set(artifacts) < {"model.safetensors", "config.json"}:
        raise OnlinePredictionUnsupported(f"{version} has no weights and config to serve.")
    limit = settings.ONLINE_PREDICTION_MAX_MODEL_BYTES
    size = artifacts["model.safetensors"].size_bytes
    if size > limit:
        raise ModelTooLarge(
            f"{version}'s weights ({size:,} bytes) are over the {limit:,} bytes served online; "
            "submit a job of kind infer instead."
        )
    try:
        config, weights = model_cache.get(
            version.pk,
            lambda: _load(version.pk),
            budget=settings.ONLINE_PREDICTION_CACHE_BYTES,
        )
        predictions = predict_rows(config, weights, rows)
    except RecipeInputError as exc:
        raise DomainError(str(exc), fields={"rows": [str(exc)]}) from exc
    except (KeyError, ValueError, TypeError) as exc:
        # Weights or config that do not match the recipe (e.g. registered by hand).
        raise OnlinePredictionUnsupported(
            f"{version} cannot be served online: its files do not match {version.recipe_name}."
        ) from exc
    predictions_meter(
        version=version,
        count=len(rows),
        request={"version": version.pk, "rows": rows},
        actor=actor,
        idempotency_key=idempotency_key,
    )
    return predictions
