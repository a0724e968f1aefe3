"""Recording the loop's steps: each one is a row on the deployment's timeline (with its cost) and
an audit event in the same transaction, attributed to the actor the loop acts as."""

from __future__ import annotations

from decimal import Decimal
from math import ceil

from django.db.models import Model

from billing.selectors import minor_per_unit
from jobs.models import Job
from jobs.services import cost_rate_per_hour
from jobs.services.submission import MAX_RUNTIME_S
from registry.models import ModelVersion
from tenants.actors import Actor
from tenants.services import audit_record
from webhooks.services import event_publish

from .models import Deployment, LoopEvent, RetrainPolicy

# The loop's steps a tenant's own systems are told of (webhooks), by timeline kind.
WEBHOOK_EVENTS = {
    LoopEvent.Kind.RETRAIN_SUBMITTED: "deployment.retrain_submitted",
    LoopEvent.Kind.PROMOTED: "deployment.promoted",
    LoopEvent.Kind.ROLLED_BACK: "deployment.rolled_back",
}

# The shortest max runtime the pool admits for a job: a spending limit that buys less cannot pay
# for one.
MIN_RUNTIME_S = 60


def loop_actor(deployment: Deployment) -> Actor:
    """Who the loop acts as: whoever last saved the deployment's retrain policy, through the API
    key they used if they used one (their current role's scopes, narrowed by that key's, and
    their quota apply to what it does), else the deployment's creator; audit rows add
    `"by": "policy"`, since no person acted. With that person gone, or that key revoked or
    deleted, it holds no scopes: a retrain then needs `models:write` it lacks and is skipped,
    saying so, until someone who holds the scopes saves the policy again."""
    policy = (
        RetrainPolicy.objects.for_organization(deployment.organization)
        .filter(deployment=deployment)
        .select_related("set_by", "set_by_key__created_by", "set_by_key__organization")
        .first()
    )
    if policy is None or (policy.set_by_id is None and not policy.set_with_key):
        return Actor(user=deployment.created_by)
    if policy.set_with_key:
        if policy.set_by_key is None:
            return Actor()
        return Actor(user=policy.set_by_key.created_by, api_key=policy.set_by_key)
    return Actor(user=policy.set_by)


def minor_per_second(*, resource_class, gpu_count: int) -> Decimal:
    """A job's cost rate on the rate card, in minor units per second of runtime."""
    rate, currency = cost_rate_per_hour(resource_class=resource_class, gpu_count=gpu_count)
    return rate * minor_per_unit(currency) / 3600


def affordable_runtime_s(*, resource_class, gpu_count: int, budget_minor: int) -> int:
    """The longest runtime whose cost on the rate card fits `budget_minor`: a job is billed for
    its runtime at most, so capping its max runtime here caps what it can ever cost."""
    rate = minor_per_second(resource_class=resource_class, gpu_count=gpu_count)
    if rate <= 0:
        return MAX_RUNTIME_S
    return max(0, int(budget_minor / rate))


def max_cost_minor(*, resource_class, gpu_count: int, runtime_s: int) -> int:
    return ceil(minor_per_second(resource_class=resource_class, gpu_count=gpu_count) * runtime_s)


def loop_step_record(
    *,
    deployment: Deployment,
    kind: str,
    message: str,
    actor: Actor | None = None,
    data: dict | None = None,
    job: Job | None = None,
    model_version: ModelVersion | None = None,
    cost_minor: int = 0,
    target: Model | None = None,
) -> LoopEvent:
    """A timeline row and its audit event (`serving.loop.<kind>`), with the same data and cost."""
    data = dict(data or {})
    event = LoopEvent.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        kind=kind,
        message=message,
        data=data,
        job=job,
        model_version=model_version,
        cost_minor=cost_minor,
    )
    audit_record(
        organization=deployment.organization,
        actor=actor or loop_actor(deployment),
        action=f"serving.loop.{kind}",
        target=target or deployment,
        data={
            **data,
            "by": data.get("by", "policy"),
            "message": message,
            "cost_minor": cost_minor,
            "job": job.pk if job else None,
            "model_version": model_version.pk if model_version else None,
        },
    )
    if kind in WEBHOOK_EVENTS:
        deployment_event_publish(
            deployment=deployment,
            type=WEBHOOK_EVENTS[kind],
            data={
                "message": message,
                "cost_minor": cost_minor,
                "job_id": job.pk if job else None,
                "model_version_id": model_version.pk if model_version else None,
            },
        )
    return event


def deployment_event_publish(*, deployment: Deployment, type: str, data: dict) -> None:
    """Owe a `deployment.*` event to the organization's webhooks, naming the deployment."""
    event_publish(
        organization=deployment.organization,
        type=type,
        data={"deployment": {"id": deployment.pk, "name": deployment.name}, **data},
    )
