"""Retrain policies and the tick that turns the loop.

A deployment with an enabled policy retrains when its evidence says so (a drifted window newer
than the last trigger, the stable version's live metric past the threshold, a new version of the
policy's dataset, or the schedule), never inside the cooldown and never while a retrain of it is
still going. The retrain is an ordinary training job, submitted through the pool's admission with
the champion's recipe and parameters on the newest data, its runtime capped so that its most
expensive outcome on the rate card fits the policy's spending limit. The limit covers the whole
retrain: the evaluation job runs on what the training job's actual cost left of it.

`loop_advance` moves one deployment one step (retrain -> gate -> canary -> promote or rollback);
`loop_tick_all` does it for every deployment, skipping one another tick holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from jobs.models import Job
from jobs.services.submission import JobOptions, training_job_submit
from registry.models import DatasetVersion, ModelVersion
from tenants.errors import DomainError

from .gate import gate_decide, gate_submit
from .loop_data import retrain_data_with_feedback
from .models import Deployment, DriftReport, LoopEvent, Retrain, RetrainPolicy, Route
from .rollout import rollout_advance
from .selectors import live_metric_of, version_stats
from .timeline import (
    MIN_RUNTIME_S,
    affordable_runtime_s,
    loop_actor,
    loop_step_record,
    minor_per_second,
)

logger = logging.getLogger(__name__)

# A tick preparing a retrain's data holds it this long; after that another may take it over.
PREPARE_CLAIM_S = 600


def champion_of(deployment: Deployment) -> ModelVersion | None:
    """The version the deployment stands on: its stable live route with the largest share."""
    route = (
        Route.objects.for_organization(deployment.organization)
        .filter(deployment=deployment, mode=Route.Mode.LIVE, stage=Route.Stage.STABLE)
        .select_related("model_version__registered_model")
        .order_by("-weight", "pk")
        .first()
    )
    return route.model_version if route is not None else None


def _newest_version(dataset_id: int | None, organization) -> DatasetVersion | None:
    if dataset_id is None:
        return None
    return (
        DatasetVersion.objects.for_organization(organization)
        .filter(dataset_id=dataset_id, state=DatasetVersion.State.READY)
        .select_related("dataset")
        .order_by("-number")
        .first()
    )


def retrain_data(*, policy: RetrainPolicy, champion: ModelVersion) -> DatasetVersion | None:
    """The newest version of the policy's dataset, else of the dataset the champion trained on."""
    organization = policy.organization
    if policy.dataset_id is not None:
        return _newest_version(policy.dataset_id, organization)
    trained = champion.trained_on.order_by("-created_at").first()
    return _newest_version(trained.dataset_id if trained else None, organization)


def retrain_trigger(*, policy: RetrainPolicy, champion: ModelVersion, now: datetime) -> dict | None:
    """Why the deployment should retrain now (the evidence, as timeline data), or None. Nothing
    triggers inside the cooldown after the last trigger."""
    deployment = policy.deployment
    last = policy.last_triggered_at
    if last is not None and (now - last).total_seconds() < policy.cooldown_s:
        return None
    if policy.on_drift:
        drifted = DriftReport.objects.for_organization(policy.organization).filter(
            deployment=deployment, drifted=True
        )
        if last is not None:
            drifted = drifted.filter(created_at__gt=last)
        report = drifted.order_by("-created_at", "-pk").first()
        if report is not None:
            return {
                "trigger": "drift",
                "drift_report": report.pk,
                "drifted_share": report.drifted_share,
                "window_end": report.window_end.isoformat(),
            }
    if policy.metric_below is not None:
        found = _metric_trigger(policy=policy, champion=champion, now=now)
        if found is not None:
            return found
    if policy.on_new_data and policy.dataset_id is not None:
        newest = _newest_version(policy.dataset_id, policy.organization)
        if (
            newest is not None
            and not champion.trained_on.filter(pk=newest.pk).exists()
            and (last is None or newest.created_at > last)
        ):
            return {"trigger": "new_data", "dataset_version": newest.pk, "number": newest.number}
    if policy.every_s:
        since = last or deployment.created_at
        if (now - since).total_seconds() >= policy.every_s:
            return {"trigger": "schedule", "every_s": policy.every_s}
    return None


def _metric_trigger(*, policy: RetrainPolicy, champion: ModelVersion, now: datetime) -> dict | None:
    """The stable version's live metric over the recent window, when enough predictions were
    labelled, on the wrong side of the threshold (below for accuracy, above for an error)."""
    window = timedelta(seconds=settings.SERVING_LOOP_METRIC_WINDOW_S)
    stats = version_stats(deployment=policy.deployment, since=now - window, until=now).get(
        champion.pk
    )
    if stats is None or stats.metric is None:
        return None
    if stats.labelled < settings.SERVING_LOOP_MIN_SAMPLES:
        return None
    metric, higher = live_metric_of(policy.deployment.recipe)
    threshold = policy.metric_below
    if (stats.metric < threshold) if higher else (stats.metric > threshold):
        return {
            "trigger": "metric",
            "metric": metric,
            "value": stats.metric,
            "threshold": threshold,
            "labelled": stats.labelled,
        }
    return None


@dataclass(frozen=True)
class RetrainPlan:
    """A retrain job's shape: the champion's own training job's, when the registry knows it."""

    resource_class: object
    gpu_count: int
    priority: int
    max_runtime_s: int


def _retrain_plan(*, deployment: Deployment, champion: ModelVersion) -> RetrainPlan:
    source = (
        Job.objects.for_organization(deployment.organization)
        .filter(pk=champion.source_job_id)
        .select_related("resource_class")
        .first()
        if champion.source_job_id
        else None
    )
    if source is None:
        return RetrainPlan(deployment.resource_class, 1, 0, 3600)
    return RetrainPlan(
        source.resource_class, source.gpu_count, source.priority, source.max_runtime_s
    )


def spending_cap_s(*, plan: RetrainPlan, max_cost_minor: int) -> int:
    """The longest training runtime the spending limit pays for. The evaluation job gets what
    the training job's actual cost leaves of the same limit (serving.gate.gate_submit)."""
    return affordable_runtime_s(
        resource_class=plan.resource_class, gpu_count=plan.gpu_count, budget_minor=max_cost_minor
    )


def _skip(*, policy: RetrainPolicy, now: datetime, trigger: dict, reason: str) -> None:
    policy.last_triggered_at = now
    policy.save(update_fields=["last_triggered_at"])
    loop_step_record(
        deployment=policy.deployment,
        kind=LoopEvent.Kind.RETRAIN_SKIPPED,
        message=f"Retrain not submitted: {reason}",
        data={**trigger, "reason": reason},
    )


def _runtime_for(*, policy: RetrainPolicy, plan: RetrainPlan) -> tuple[int | None, str]:
    """(the retrain's max runtime, "") within the spending limit, or (None, why it cannot fit)."""
    cap_s = spending_cap_s(plan=plan, max_cost_minor=policy.max_cost_minor)
    if cap_s < MIN_RUNTIME_S:
        return None, (
            f"the spending limit of {policy.max_cost_minor} minor units buys {cap_s} s of "
            f"{plan.gpu_count}x {plan.resource_class}, under the {MIN_RUNTIME_S} s a job needs "
            "at least."
        )
    return min(plan.max_runtime_s, cap_s), ""


def retrain_submit(
    *, policy: RetrainPolicy, champion: ModelVersion, trigger: dict, now: datetime
) -> Retrain | None:
    """Start a retrain for a trigger, or record why not (RETRAIN_SKIPPED). Either way the trigger
    counts, so the cooldown also spaces out skips. With `append_feedback` the retrain first
    prepares its data (retrain_prepare, outside this transaction), then submits."""
    deployment = policy.deployment
    if not champion.recipe_name:
        _skip(policy=policy, now=now, trigger=trigger, reason=f"{champion} has no recipe.")
        return None
    data = retrain_data(policy=policy, champion=champion)
    if data is None:
        _skip(policy=policy, now=now, trigger=trigger, reason="no dataset version to train on.")
        return None
    runtime_s, why = _runtime_for(
        policy=policy, plan=_retrain_plan(deployment=deployment, champion=champion)
    )
    if runtime_s is None:
        _skip(policy=policy, now=now, trigger=trigger, reason=why)
        return None
    policy.last_triggered_at = now
    policy.save(update_fields=["last_triggered_at"])
    retrain = Retrain.objects.create(
        organization=policy.organization,
        deployment=deployment,
        state=Retrain.State.PREPARING,
        trigger=trigger,
        champion=champion,
    )
    if policy.append_feedback:
        return retrain
    return _job_submit(retrain=retrain, policy=policy, data=data, feedback={})


def _job_submit(
    *, retrain: Retrain, policy: RetrainPolicy, data: DatasetVersion, feedback: dict
) -> Retrain:
    """Submit the training job of a preparing retrain (under its deployment's lock); a refusal
    (quota, scopes, the limit) ends the retrain as skipped, saying why."""
    deployment, champion = retrain.deployment, retrain.champion
    plan = _retrain_plan(deployment=deployment, champion=champion)
    runtime_s, why = _runtime_for(policy=policy, plan=plan)
    job = None
    if runtime_s is not None:
        options = JobOptions(
            resource_class=plan.resource_class,
            gpu_count=plan.gpu_count,
            priority=plan.priority,
            max_runtime_s=runtime_s,
            labels={"deployment": deployment.name, "loop": "retrain"},
        )
        try:
            with transaction.atomic():
                job, _created = training_job_submit(
                    organization=policy.organization,
                    actor=loop_actor(deployment),
                    recipe=champion.recipe_name,
                    parameters=champion.parameters,
                    dataset_version=data,
                    options=options,
                    output_model_name=champion.registered_model.name,
                    idempotency_key=f"loop-retrain-{retrain.pk}",
                )
        except DomainError as exc:
            why = exc.detail
    if job is None:
        retrain.state, retrain.finished_at = Retrain.State.FAILED, timezone.now()
        retrain.save(update_fields=["state", "finished_at"])
        loop_step_record(
            deployment=deployment,
            kind=LoopEvent.Kind.RETRAIN_SKIPPED,
            message=f"Retrain not submitted: {why}",
            data={**retrain.trigger, "retrain": retrain.pk, "reason": why, **feedback},
            target=retrain,
        )
        return retrain
    retrain.job, retrain.state, retrain.step_started_at = job, Retrain.State.TRAINING, None
    retrain.save(update_fields=["job", "state", "step_started_at"])
    rate = minor_per_second(resource_class=plan.resource_class, gpu_count=plan.gpu_count)
    most = int(rate * runtime_s)
    appended = (
        f" with {feedback['feedback_rows']} labelled predictions appended"
        if feedback.get("feedback_rows")
        else ""
    )
    note = (
        f" Feedback not appended: {feedback['feedback_error']}"
        if "feedback_error" in feedback
        else ""
    )
    loop_step_record(
        deployment=deployment,
        kind=LoopEvent.Kind.RETRAIN_SUBMITTED,
        message=f"Retraining {champion.registered_model.name} on {data}{appended} "
        f"({retrain.trigger.get('trigger')}); at most {runtime_s} s, {most} minor units.{note}",
        data={
            **retrain.trigger,
            **feedback,
            "retrain": retrain.pk,
            "dataset_version": data.pk,
            "max_runtime_s": runtime_s,
            "max_cost_minor": most,
            "spending_limit_minor": policy.max_cost_minor,
        },
        job=job,
        model_version=champion,
        target=retrain,
    )
    return retrain


def retrain_prepare(*, retrain_id: int, now: datetime | None = None) -> Retrain | None:
    """Build a preparing retrain's data (the newest version with its labelled feedback), then
    submit its job. Runs outside any transaction (it reads and writes storage); a tick claims the
    preparation first, so two ticks never build it twice, and one that died is taken over after
    PREPARE_CLAIM_S."""
    now = now or timezone.now()
    claimed = (
        Retrain.objects.filter(pk=retrain_id, state=Retrain.State.PREPARING)
        .filter(
            Q(step_started_at__isnull=True)
            | Q(step_started_at__lt=now - timedelta(seconds=PREPARE_CLAIM_S))
        )
        .update(step_started_at=now)
    )
    if not claimed:
        return None
    retrain = Retrain.objects.select_related(
        "deployment__organization", "deployment__created_by", "champion__registered_model"
    ).get(pk=retrain_id)
    deployment = retrain.deployment
    policy = (
        RetrainPolicy.objects.for_organization(deployment.organization)
        .filter(deployment=deployment)
        .first()
    )
    base = retrain_data(policy=policy, champion=retrain.champion) if policy else None
    data, feedback = base, {}
    if policy is not None and policy.append_feedback and base is not None:
        try:
            data, rows = retrain_data_with_feedback(
                deployment=deployment,
                base=base,
                target=str((retrain.champion.parameters or {}).get("target", "")),
                actor=loop_actor(deployment),
            )
            feedback = {"feedback_rows": rows, "feedback_base": base.pk}
        except DomainError as exc:
            feedback = {"feedback_error": exc.detail}
    with transaction.atomic():
        Deployment.objects.select_for_update(no_key=True, of=("self",)).get(pk=deployment.pk)
        retrain = (
            Retrain.objects.select_for_update(of=("self",))
            .select_related("deployment__organization", "champion__registered_model")
            .get(pk=retrain_id)
        )
        if retrain.state != Retrain.State.PREPARING or retrain.step_started_at != now:
            return None  # another tick took it over
        if policy is None or data is None:
            retrain.state, retrain.finished_at = Retrain.State.FAILED, timezone.now()
            retrain.save(update_fields=["state", "finished_at"])
            return retrain
        return _job_submit(retrain=retrain, policy=policy, data=data, feedback=feedback)


def _training_ended(*, retrain: Retrain, policy: RetrainPolicy) -> Retrain:
    """The retrain job ended: its cost goes on the RETRAIN_SUBMITTED row; a success with a model
    version goes to the gate, anything else ends the retrain."""
    job = Job.objects.select_related("output_model_version").get(pk=retrain.job_id)
    if not job.is_terminal:
        return retrain
    LoopEvent.objects.filter(
        deployment=retrain.deployment, kind=LoopEvent.Kind.RETRAIN_SUBMITTED, job=job
    ).update(cost_minor=job.cost_minor)
    if job.state == Job.State.SUCCEEDED and job.output_model_version is not None:
        # The job as it ended: the evaluation's share of the spending limit is what its final
        # cost left.
        retrain.job, retrain.challenger = job, job.output_model_version
        retrain.save(update_fields=["challenger"])
        try:
            with transaction.atomic():
                return gate_submit(retrain=retrain, policy=policy)
        except DomainError:
            logger.warning("evaluation of retrain %s not admitted yet", retrain.pk, exc_info=True)
            return retrain
    retrain.state, retrain.finished_at = Retrain.State.FAILED, timezone.now()
    retrain.save(update_fields=["state", "finished_at"])
    loop_step_record(
        deployment=retrain.deployment,
        kind=LoopEvent.Kind.RETRAIN_FAILED,
        message=f"The retrain job {job.pk} ended {job.state}"
        + (f": {job.failure_reason}" if job.failure_reason else "."),
        data={"retrain": retrain.pk, "state": job.state},
        job=job,
        cost_minor=job.cost_minor,
        target=retrain,
    )
    return retrain


def retrain_advance(*, retrain: Retrain, policy: RetrainPolicy, now: datetime) -> Retrain:
    if retrain.state == Retrain.State.TRAINING:
        return _training_ended(retrain=retrain, policy=policy)
    if retrain.state == Retrain.State.EVALUATING:
        return gate_decide(retrain=retrain, policy=policy)
    if retrain.state in (Retrain.State.CANARY, Retrain.State.INCONCLUSIVE):
        return rollout_advance(retrain=retrain, policy=policy, now=now)
    return retrain


def loop_advance(*, deployment_id: int, now: datetime | None = None) -> Retrain | None:
    """One step of one deployment's loop, under its row lock; a deployment another tick holds is
    skipped (it is being advanced). A retrain preparing its data does that after the lock is
    released. Returns the retrain it moved, if any."""
    now = now or timezone.now()
    retrain = _advance_locked(deployment_id=deployment_id, now=now)
    if retrain is not None and retrain.state == Retrain.State.PREPARING:
        return retrain_prepare(retrain_id=retrain.pk, now=now) or retrain
    return retrain


def _advance_locked(*, deployment_id: int, now: datetime) -> Retrain | None:
    with transaction.atomic():
        deployment = (
            # No key update: see reconciler.cold_start (timeline rows of other processes).
            Deployment.objects.select_for_update(no_key=True, skip_locked=True, of=("self",))
            .select_related("organization", "resource_class", "created_by")
            .filter(pk=deployment_id)
            .first()
        )
        if deployment is None:
            return None
        policy = (
            RetrainPolicy.objects.for_organization(deployment.organization)
            .filter(deployment=deployment)
            .first()
        )
        retrain = (
            Retrain.objects.for_organization(deployment.organization)
            .select_for_update()
            .filter(deployment=deployment, state__in=Retrain.ACTIVE_STATES)
            .first()
        )
        if retrain is not None:
            retrain.deployment = deployment
            # A retrain under way finishes under the policy's current settings (its defaults if
            # the policy was deleted), so a canary is still watched and rolled back.
            policy = policy or RetrainPolicy(
                organization=deployment.organization, deployment=deployment
            )
            policy.deployment = deployment
            return retrain_advance(retrain=retrain, policy=policy, now=now)
        if policy is None or not policy.enabled:
            return None
        policy.deployment = deployment
        champion = champion_of(deployment)
        if champion is None:
            return None
        trigger = retrain_trigger(policy=policy, champion=champion, now=now)
        if trigger is None:
            return None
        return retrain_submit(policy=policy, champion=champion, trigger=trigger, now=now)


def loop_tick_all(*, now: datetime | None = None) -> int:
    """Advance every deployment with a policy or a retrain under way; returns how many moved.
    One deployment's failure is logged and does not hold up the others."""
    ids = (
        Deployment.objects.filter(
            Q(retrain_policy__enabled=True) | Q(retrains__state__in=Retrain.ACTIVE_STATES)
        )
        .distinct()
        .values_list("pk", flat=True)
    )
    moved = 0
    for deployment_id in ids:
        try:
            moved += loop_advance(deployment_id=deployment_id, now=now) is not None
        except Exception:
            logger.exception("the loop could not advance deployment %s", deployment_id)
    return moved
