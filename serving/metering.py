"""Billing online predictions: one narrow charge row per answered request on the request path,
priced into the ledger off it.

A predict writes its log rows and one `PredictionCharge` in one transaction (serving.gateway), so
a prediction a caller was given is always charged, and one that could not be charged was never
given. `predictions_bill`, run by beat every SERVING_BILL_EVERY_S, rolls the pending charges up
into ledger rows (billing.services.usage_record_many: price, month tally, Stripe outbox), one per
deployment, model version, caller and month, and marks the charges with their row in the same
transaction: each charge is billed exactly once, however often the roll-up runs or fails.

The cost: usage reports, budgets and the hard cap see a prediction up to SERVING_BILL_EVERY_S
(plus a beat period) after it was made, as they see a replica's serving seconds.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.models import UsageRecord
from billing.selectors import billing_month
from billing.services import usage_record_many
from registry.models import ModelVersion
from tenants.actors import Actor
from tenants.errors import DomainError

from .deletion import delete_in_batches
from .models import Deployment, PredictionCharge

IDEMPOTENCY_KEY_MAX = 200


def idempotency_key_check(idempotency_key: str | None) -> None:
    if idempotency_key and len(idempotency_key) > IDEMPOTENCY_KEY_MAX:
        raise DomainError(
            "The Idempotency-Key header is too long.",
            fields={"idempotency_key": [f"At most {IDEMPOTENCY_KEY_MAX} characters, e.g. a UUID."]},
        )


def _repeat_of(
    *, organization, request_key: str, now: datetime
) -> tuple[int, PredictionCharge | None]:
    """Which repeat of this request `now` is. A client's retry (same key, same request) within
    IDEMPOTENCY_WINDOW_S of the first request is that request again; after the window the same
    request is a new prediction, as at Stripe (else a monitor's fixed key would make its repeated
    request free forever). Repeats are numbered so that concurrent retries compute the same
    number and the unique constraint keeps one charge."""
    latest = (
        PredictionCharge.objects.for_organization(organization)
        .filter(request_key=request_key)
        .order_by("-created_at", "-pk")
        .only("repeat", "created_at")
        .first()
    )
    if latest is None:
        return 1, None
    if now - latest.created_at < timedelta(seconds=settings.IDEMPOTENCY_WINDOW_S):
        return latest.repeat, latest
    return latest.repeat + 1, None


def prediction_charge(
    *,
    deployment: Deployment,
    version: ModelVersion,
    count: int,
    inputs: list,
    actor: Actor,
    idempotency_key: str | None = None,
) -> None:
    """Charge `count` predictions of `version` made by `deployment` for `actor`, once per
    Idempotency-Key and inputs within IDEMPOTENCY_WINDOW_S. Run it inside the transaction that
    logs the predictions."""
    now = timezone.now()
    request_key, repeat = "", 1
    if idempotency_key:
        fingerprint = json.dumps(
            {"key": idempotency_key, "deployment": deployment.pk, "inputs": inputs},
            sort_keys=True,
            default=str,
        )
        request_key = hashlib.sha256(fingerprint.encode()).hexdigest()
        repeat, first = _repeat_of(
            organization=deployment.organization, request_key=request_key, now=now
        )
        if first is not None:
            return
    PredictionCharge.objects.bulk_create(
        [
            PredictionCharge(
                organization_id=deployment.organization_id,
                deployment=deployment,
                source_id=str(deployment.pk),
                model_version=version,
                model_name=version.registered_model.name,
                count=count,
                user=actor.api_key.created_by if actor.api_key else actor.user,
                api_key=actor.api_key,
                request_key=request_key,
                repeat=repeat,
                created_at=now,
            )
        ],
        # A concurrent retry charged this repeat first: it is that request's charge.
        ignore_conflicts=bool(request_key),
    )


def predictions_bill(*, limit: int | None = None) -> int:
    """Roll pending charges (the oldest `limit`, SERVING_BILL_BATCH by default) up into the
    ledger; returns how many charges were billed. Concurrent runs take disjoint charges."""
    limit = limit or settings.SERVING_BILL_BATCH
    with transaction.atomic():
        charges = list(
            PredictionCharge.objects.filter(usage__isnull=True)
            .select_for_update(skip_locked=True)
            .order_by("pk")[:limit]
        )
        if not charges:
            return 0
        groups: dict[tuple, list[PredictionCharge]] = defaultdict(list)
        for charge in charges:
            month = billing_month(charge.created_at)
            groups[
                (
                    charge.organization_id,
                    charge.source_id,
                    charge.model_version_id,
                    charge.model_name,
                    charge.user_id,
                    charge.api_key_id,
                    month,
                )
            ].append(charge)
        rows = [
            UsageRecord(
                organization_id=group[0].organization_id,
                resource="predictions",
                quantity=Decimal(sum(c.count for c in group)) / 1000,
                unit="1k_predictions",
                period_start=min(c.created_at for c in group),
                period_end=max(c.created_at for c in group),
                # Charges are billed once, in the transaction that writes this row: the first
                # charge's id names the row uniquely, and a failed run leaves no trace to clash.
                idempotency_key=f"predictions:{group[0].pk}",
                source_type="deployment",
                source_id=group[0].source_id,
                user_id=group[0].user_id,
                api_key_id=group[0].api_key_id,
                model_name=group[0].model_name,
                labels={
                    "requests": str(len(group)),
                    "model_version": str(group[0].model_version_id or ""),
                },
            )
            for group in groups.values()
        ]
        for (row, _created), group in zip(
            usage_record_many(rows=rows), groups.values(), strict=True
        ):
            PredictionCharge.objects.filter(pk__in=[c.pk for c in group]).update(usage=row)
    return len(charges)


def prediction_charges_expire(*, now: datetime, batch: int) -> int:
    """Delete billed charges older than the idempotency window (they only answer retries), a
    batch at a time; returns how many."""
    cutoff = now - timedelta(seconds=settings.IDEMPOTENCY_WINDOW_S)
    billed = PredictionCharge.objects.filter(usage__isnull=False, created_at__lt=cutoff)
    return delete_in_batches(billed, batch=batch)[0]
