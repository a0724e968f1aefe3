"""Canary, step, promote and rollback: a passing challenger takes a share of live traffic, bakes,
and steps up to 100% unless, over the bake, it answered worse than the stable version by the
policy's thresholds; then it is rolled back. A canary too quiet to judge bakes on for the policy's
extensions, then pauses as inconclusive, keeping its share, until a person with `models:promote`
promotes it or rolls it back (through the gate's approve and reject). Every move of route weights
is audited and is a row on the deployment's timeline with the canary replicas' serving cost over
the bake."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from math import ceil

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from registry.models import ModelVersion
from registry.services.model_versions import model_alias_set
from tenants.actors import Actor
from tenants.errors import DomainError

from .models import Deployment, LoopEvent, Replica, Retrain, RetrainPolicy, Route
from .selectors import VersionStats, live_metric_of, version_stats
from .services import routes_set
from .timeline import loop_actor, loop_step_record, minor_per_second

# The shares a canary passes through after its first one; reaching 100% promotes it.
CANARY_STEPS = (50, 100)
PRODUCTION_ALIAS = "production"
PROMOTE_SCOPE = "models:promote"


def _routes_apply(
    *, deployment: Deployment, routes: list[dict], actor: Actor, data: dict | None = None
) -> None:
    """Make `routes` ([{model_version, weight, stage}]) the deployment's live routes, through
    routes_set (validated, audited with `data`, replicas of versions no longer routed drained);
    shadow routes of other versions stay. The loop's step itself is its own timeline row."""
    live = {route["model_version"].pk for route in routes}
    shadows = [
        {
            "model_version": route.model_version,
            "weight": route.weight,
            "mode": Route.Mode.SHADOW,
            "stage": route.stage,
        }
        for route in Route.objects.for_organization(deployment.organization)
        .filter(deployment=deployment, mode=Route.Mode.SHADOW)
        .exclude(model_version_id__in=live)
        .select_related("model_version")
    ]
    routes_set(
        deployment=deployment,
        routes=[{**route, "mode": Route.Mode.LIVE} for route in routes] + shadows,
        actor=actor,
        event_kind=None,
        event_data=data,
    )


def _shares(stable: ModelVersion, canary: ModelVersion, percent: int) -> list[dict]:
    return [
        {"model_version": stable, "weight": 100 - percent, "stage": Route.Stage.STABLE},
        {"model_version": canary, "weight": percent, "stage": Route.Stage.CANARY},
    ]


def serving_cost_minor(
    *, deployment: Deployment, model_version: ModelVersion, since: datetime, until: datetime
) -> int:
    """What the version's replicas cost over [since, until): each replica's slot-seconds in the
    window at its job's rate on the rate card (the ledger bills the same rate per attempt)."""
    replicas = (
        Replica.objects.for_organization(deployment.organization)
        .filter(deployment=deployment, model_version=model_version, created_at__lt=until)
        .filter(Q(stopped_at__isnull=True) | Q(stopped_at__gt=since))
        .select_related("job__resource_class")
    )
    total = Decimal(0)
    for replica in replicas:
        start = max(replica.created_at, since)
        end = min(replica.stopped_at or until, until)
        seconds = max(0.0, (end - start).total_seconds())
        rate = minor_per_second(
            resource_class=replica.job.resource_class, gpu_count=replica.job.gpu_count
        )
        total += rate * Decimal(str(seconds))
    return ceil(total)


@transaction.atomic
def rollout_start(*, retrain: Retrain, policy: RetrainPolicy, actor: Actor) -> Retrain:
    """The challenger becomes a canary at the policy's share, the stable version keeps the rest."""
    percent = min(max(policy.canary_percent, 1), 100)
    deployment = retrain.deployment
    _routes_apply(
        deployment=deployment,
        routes=_shares(retrain.champion, retrain.challenger, percent),
        actor=actor,
        data={"by": "policy", "step": "canary_start", "retrain": retrain.pk},
    )
    retrain.state, retrain.canary_percent = Retrain.State.CANARY, percent
    retrain.step_started_at = timezone.now()
    retrain.save(update_fields=["state", "canary_percent", "step_started_at"])
    loop_step_record(
        deployment=deployment,
        kind=LoopEvent.Kind.CANARY_STARTED,
        message=f"{retrain.challenger} takes {percent}% of live traffic as a canary; "
        f"{retrain.champion} keeps {100 - percent}%.",
        data={"percent": percent, "retrain": retrain.pk, "stable": retrain.champion.pk},
        model_version=retrain.challenger,
        actor=actor,
        target=retrain,
    )
    return retrain


def _worse(canary: float, stable: float, higher_is_better: bool) -> float:
    """How much worse the canary's metric is than the stable's (positive: worse)."""
    return stable - canary if higher_is_better else canary - stable


def rollback_reasons(
    *,
    canary: VersionStats,
    stable: VersionStats | None,
    policy: RetrainPolicy,
    higher_is_better: bool,
    min_samples: int,
) -> list[str]:
    """Why the canary must go, from its stats and the stable version's over the same bake; empty
    when it did no worse than the policy allows. A metric is compared only when both versions
    have `min_samples` labelled predictions."""
    reasons = []
    stable_error_rate = stable.error_rate if stable else 0.0
    if canary.error_rate > stable_error_rate + policy.rollback_error_rate:
        reasons.append(
            f"error rate {canary.error_rate:.4f} > stable {stable_error_rate:.4f} "
            f"+ {policy.rollback_error_rate:g}"
        )
    if (
        stable
        and stable.p99_ms
        and canary.p99_ms is not None
        and canary.p99_ms > stable.p99_ms * policy.rollback_p99_ratio
    ):
        reasons.append(
            f"p99 {canary.p99_ms:.1f} ms > stable {stable.p99_ms:.1f} ms "
            f"x {policy.rollback_p99_ratio:g}"
        )
    if (
        stable
        and canary.metric is not None
        and stable.metric is not None
        and canary.labelled >= min_samples
        and stable.labelled >= min_samples
    ):
        drop = _worse(canary.metric, stable.metric, higher_is_better)
        if drop > policy.rollback_metric_drop:
            reasons.append(
                f"live metric {canary.metric:.4f} is {drop:.4f} worse than stable "
                f"{stable.metric:.4f} (allowed {policy.rollback_metric_drop:g})"
            )
    return reasons


def _stats_data(stats: VersionStats | None) -> dict | None:
    if stats is None:
        return None
    return {
        "requests": stats.requests,
        "errors": stats.errors,
        "error_rate": stats.error_rate,
        "p50_ms": stats.p50_ms,
        "p99_ms": stats.p99_ms,
        "labelled": stats.labelled,
        "metric": stats.metric,
    }


def _evidence(
    *, retrain: Retrain, since: datetime, until: datetime
) -> tuple[VersionStats | None, VersionStats | None, dict, int]:
    """The canary's and the stable version's stats over [since, until), as timeline data, and
    what the canary's replicas cost over it."""
    deployment = retrain.deployment
    stats = version_stats(deployment=deployment, since=since, until=until)
    canary, stable = stats.get(retrain.challenger_id), stats.get(retrain.champion_id)
    metric, _higher = live_metric_of(deployment.recipe)
    data = {
        "retrain": retrain.pk,
        "percent": retrain.canary_percent,
        "bake": {"since": since.isoformat(), "until": until.isoformat()},
        "metric": metric,
        "canary": _stats_data(canary),
        "stable": _stats_data(stable),
    }
    cost = serving_cost_minor(
        deployment=deployment, model_version=retrain.challenger, since=since, until=until
    )
    return canary, stable, data, cost


def rollout_advance(*, retrain: Retrain, policy: RetrainPolicy, now: datetime) -> Retrain:
    """After a bake, roll the canary back or step it up (promoting it at 100%). A canary with
    fewer than SERVING_LOOP_MIN_SAMPLES requests since its step began keeps baking, for up to
    `bake_extensions` more bakes; then it pauses as inconclusive. No evidence is not good
    evidence: only a person promotes a canary no one could judge."""
    started = retrain.step_started_at
    if _routes_changed_by_hand(retrain):
        return _abandon(retrain=retrain, now=now)
    if retrain.state == Retrain.State.INCONCLUSIVE:
        return retrain  # a person decides: rollout_decide
    if started is None or (now - started).total_seconds() < policy.bake_s:
        return retrain
    min_samples = settings.SERVING_LOOP_MIN_SAMPLES
    canary, stable, data, cost = _evidence(retrain=retrain, since=started, until=now)
    seen = canary.requests if canary is not None else 0
    if seen < min_samples:
        longest = policy.bake_s * (1 + policy.bake_extensions)
        if (now - started).total_seconds() < longest:
            return retrain
        return _pause(
            retrain=retrain,
            data={
                **data,
                "requests": seen,
                "needed": min_samples,
                "bake_s": policy.bake_s,
                "extensions": policy.bake_extensions,
            },
            cost=cost,
            now=now,
        )
    _metric, higher = live_metric_of(retrain.deployment.recipe)
    reasons = rollback_reasons(
        canary=canary,
        stable=stable,
        policy=policy,
        higher_is_better=higher,
        min_samples=min_samples,
    )
    if reasons:
        return _rollback(retrain=retrain, reasons=reasons, data=data, cost=cost, now=now)
    following = [step for step in CANARY_STEPS if step > retrain.canary_percent] or [100]
    if following[0] >= 100:
        return _promote(retrain=retrain, data=data, cost=cost, now=now)
    return _step(retrain=retrain, percent=following[0], data=data, cost=cost, now=now)


def _pause(*, retrain: Retrain, data: dict, cost: int, now: datetime) -> Retrain:
    """Too few requests over every extended bake: the canary keeps its share and waits for a
    person. Its next step (the person's) is costed from here, so no time is counted twice."""
    waited = round((now - retrain.step_started_at).total_seconds())
    retrain.state, retrain.step_started_at = Retrain.State.INCONCLUSIVE, now
    retrain.save(update_fields=["state", "step_started_at"])
    loop_step_record(
        deployment=retrain.deployment,
        kind=LoopEvent.Kind.CANARY_INCONCLUSIVE,
        message=f"{retrain.challenger} saw {data['requests']} requests at {data['percent']}% "
        f"in {waited} s (a bake of {data['bake_s']} s extended {data['extensions']} times); "
        f"judging it needs {data['needed']}. It keeps its share until a person with "
        f"{PROMOTE_SCOPE} promotes it or rolls it back.",
        data=data,
        model_version=retrain.challenger,
        cost_minor=cost,
        target=retrain,
    )
    return retrain


def rollout_decide(*, retrain: Retrain, actor: Actor, promote: bool, reason: str = "") -> Retrain:
    """A person's decision on an inconclusive canary (the caller checked their scope and holds
    the retrain's lock): promote it to 100%, or roll it back to the stable version."""
    now = timezone.now()
    _canary, _stable, data, cost = _evidence(
        retrain=retrain, since=retrain.step_started_at or now, until=now
    )
    data = {**data, "by": "user", "reason": reason}
    if promote:
        return _promote(
            retrain=retrain,
            data=data,
            cost=cost,
            now=now,
            actor=actor,
            how=f"was promoted from {retrain.canary_percent}% by {actor.label} after an "
            "inconclusive canary",
        )
    why = f"rolled back by {actor.label} after an inconclusive canary" + (
        f": {reason}" if reason else ""
    )
    return _rollback(retrain=retrain, reasons=[why], data=data, cost=cost, now=now, actor=actor)


def _routes_changed_by_hand(retrain: Retrain) -> bool:
    """Whether the live routes are no longer the canary's split (someone changed them)."""
    live = {
        (route.model_version_id, route.weight)
        for route in Route.objects.for_organization(retrain.organization).filter(
            deployment=retrain.deployment_id, mode=Route.Mode.LIVE
        )
    }
    percent = retrain.canary_percent
    return live != {(retrain.champion_id, 100 - percent), (retrain.challenger_id, percent)}


def _abandon(*, retrain: Retrain, now) -> Retrain:
    """A person moved the weights during the canary: theirs stand, and the loop lets go."""
    retrain.state, retrain.finished_at = Retrain.State.FAILED, now
    retrain.save(update_fields=["state", "finished_at"])
    loop_step_record(
        deployment=retrain.deployment,
        kind=LoopEvent.Kind.RETRAIN_FAILED,
        message=f"The routes were changed by hand during {retrain.challenger}'s canary; the "
        "loop leaves them as they are and ends this retrain.",
        data={"retrain": retrain.pk, "percent": retrain.canary_percent},
        model_version=retrain.challenger,
        target=retrain,
    )
    return retrain


def _rollback(
    *,
    retrain: Retrain,
    reasons: list[str],
    data: dict,
    cost: int,
    now,
    actor: Actor | None = None,
) -> Retrain:
    """Back to the stable version alone: by the policy, or by `actor` (a person)."""
    deployment = retrain.deployment
    by = "user" if actor else "policy"
    actor = actor or loop_actor(deployment)
    _routes_apply(
        deployment=deployment,
        routes=[{"model_version": retrain.champion, "weight": 100, "stage": Route.Stage.STABLE}],
        actor=actor,
        data={"by": by, "step": "rollback", "retrain": retrain.pk},
    )
    retrain.state, retrain.canary_percent, retrain.finished_at = (
        Retrain.State.ROLLED_BACK,
        0,
        now,
    )
    retrain.save(update_fields=["state", "canary_percent", "finished_at"])
    loop_step_record(
        deployment=deployment,
        kind=LoopEvent.Kind.ROLLED_BACK,
        message=f"{retrain.challenger} rolled back to {retrain.champion}: " + "; ".join(reasons),
        data={**data, "reasons": reasons},
        model_version=retrain.challenger,
        cost_minor=cost,
        actor=actor,
        target=retrain,
    )
    return retrain


def _step(*, retrain: Retrain, percent: int, data: dict, cost: int, now) -> Retrain:
    deployment = retrain.deployment
    actor = loop_actor(deployment)
    _routes_apply(
        deployment=deployment,
        routes=_shares(retrain.champion, retrain.challenger, percent),
        actor=actor,
        data={"by": "policy", "step": "canary_step", "retrain": retrain.pk},
    )
    previous = retrain.canary_percent
    retrain.canary_percent, retrain.step_started_at = percent, now
    retrain.save(update_fields=["canary_percent", "step_started_at"])
    loop_step_record(
        deployment=deployment,
        kind=LoopEvent.Kind.CANARY_STEPPED,
        message=f"{retrain.challenger} baked at {previous}% and steps up to {percent}%.",
        data={**data, "from": previous, "to": percent},
        model_version=retrain.challenger,
        cost_minor=cost,
        actor=actor,
        target=retrain,
    )
    return retrain


def _promote(
    *,
    retrain: Retrain,
    data: dict,
    cost: int,
    now,
    actor: Actor | None = None,
    how: str = "",
) -> Retrain:
    """The challenger serves 100% as the stable version, the old stable's route goes, and the
    registry's `production` alias follows (unless the model's own promotion gates refuse it,
    which is recorded, not fatal: the deployment already serves the version). By the policy
    after a bake, or by `actor` (a person), `how` saying so."""
    deployment = retrain.deployment
    by = "user" if actor else "policy"
    actor = actor or loop_actor(deployment)
    how = how or f"baked at {data['percent']}%"
    challenger = retrain.challenger
    _routes_apply(
        deployment=deployment,
        routes=[{"model_version": challenger, "weight": 100, "stage": Route.Stage.STABLE}],
        actor=actor,
        data={"by": by, "step": "promote", "retrain": retrain.pk},
    )
    alias: dict = {"alias": PRODUCTION_ALIAS}
    try:
        with transaction.atomic():
            model_alias_set(
                registered_model=challenger.registered_model,
                alias=PRODUCTION_ALIAS,
                version=challenger,
                actor=actor,
            )
        alias["moved_to"] = challenger.number
    except DomainError as exc:
        alias["error"] = exc.detail
    retrain.state, retrain.canary_percent, retrain.finished_at = (
        Retrain.State.PROMOTED,
        100,
        now,
    )
    retrain.save(update_fields=["state", "canary_percent", "finished_at"])
    loop_step_record(
        deployment=deployment,
        kind=LoopEvent.Kind.PROMOTED,
        message=f"{challenger} {how} and now serves 100% as the stable version; "
        f"{retrain.champion} is no longer routed.",
        data={**data, "from": data["percent"], "to": 100, "registry": alias},
        model_version=challenger,
        cost_minor=cost,
        actor=actor,
        target=retrain,
    )
    return retrain
