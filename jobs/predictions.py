"""Metering of online predictions, which deployments answer (serving/gateway.py): billed per
1,000 predictions, once per client Idempotency-Key and request within IDEMPOTENCY_WINDOW_S.

Predictions are made by replicas on the pool, never in the web process; this module holds only
the ledger side, which lives in jobs because serving imports jobs and not the other way round.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.utils import timezone

from billing.selectors import usage_latest_keyed
from billing.services import usage_record
from registry.models import ModelVersion
from tenants.actors import Actor
from tenants.errors import DomainError

IDEMPOTENCY_KEY_MAX = 200


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
    True when newly billed."""
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
