"""The evaluation gate: a retrained challenger is scored against the champion on the same held-out
rows (the validation split of the data it trained on, which training never saw) by an `evaluate`
job on the pool, overall and per slice of the policy's column. The gate decides, writes the model
card, and lets the challenger into a canary itself or waits for a person with `models:promote`.
The evaluate job is paid from the retrain's spending limit too: it may run for what the training
job's cost left, and a challenger whose training spent it all fails unevaluated.

The evaluate job's result (jobs/runner/evaluate.py writes it) is one JobEvent of kind
`evaluation` whose data is
    {"metric": "accuracy", "higher_is_better": true, "rows": n, "slice_column": "region",
     "challenger": {"overall": x, "slices": {"eu": x, ...}},
     "champion": {"overall": x, "slices": {...}}}
Every recipe is judged on its own metric (LIVE_METRICS, the recipe's `gate_metric`): accuracy
for the classifiers, the mean absolute error (lower is better) for the forecaster.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from jobs.models import Job, JobEvent
from jobs.recipes.catalog import get_recipe
from jobs.services.submission import JobOptions, JobSpec, job_admit
from tenants.actors import Actor
from tenants.errors import ConflictError, DomainError, PermissionDeniedError
from tenants.selectors import actor_scopes

from .models import Deployment, LoopEvent, ModelCard, Retrain, RetrainPolicy
from .rollout import PROMOTE_SCOPE, rollout_decide, rollout_start
from .selectors import live_metric_of
from .timeline import MIN_RUNTIME_S, affordable_runtime_s, loop_actor, loop_step_record

logger = logging.getLogger(__name__)

EVALUATION_EVENT = "evaluation"
EVALUATE_GPUS = 1


def evaluation_parameters(*, retrain: Retrain, policy: RetrainPolicy) -> dict:
    """What the evaluate job needs beside its challenger (the job's input model) and the data (its
    input dataset version): the champion, the recipe's training parameters (so it splits the rows
    exactly as training did), the metric and the slice column."""
    metric, higher = live_metric_of(retrain.deployment.recipe)
    return {
        "champion_model_version": retrain.champion_id,
        "training_parameters": retrain.challenger.parameters or retrain.job.parameters,
        # The runner seeds a training run's split with its job's id: the same seed draws the
        # same validation rows, the ones the challenger never trained on.
        "split_seed": retrain.job_id,
        "metric": metric,
        "higher_is_better": higher,
        "slice_column": policy.slice_column,
    }


def evaluation_runtime_s(*, retrain: Retrain, policy: RetrainPolicy) -> tuple[int, int]:
    """(what the training job's actual cost left of the policy's spending limit, the longest
    evaluation that fits in it, at most SERVING_LOOP_EVALUATE_MAX_RUNTIME_S): the limit is per
    retrain, training and evaluation together."""
    left = policy.max_cost_minor - retrain.job.cost_minor
    affordable = affordable_runtime_s(
        resource_class=retrain.job.resource_class,
        gpu_count=EVALUATE_GPUS,
        budget_minor=max(left, 0),
    )
    return left, min(settings.SERVING_LOOP_EVALUATE_MAX_RUNTIME_S, affordable)


def gate_submit(*, retrain: Retrain, policy: RetrainPolicy) -> Retrain:
    """Queue the evaluate job for a trained challenger (on the retrain job's resource class, for
    as long as the spending limit has left, see evaluation_runtime_s); with too little left for a
    job, the gate fails the challenger unevaluated, saying so. Idempotent per retrain: a refused
    submit (a full queue) leaves the retrain training, and the next tick tries again with the
    same key."""
    left, runtime_s = evaluation_runtime_s(retrain=retrain, policy=policy)
    if runtime_s < MIN_RUNTIME_S:
        return _gate_fail_unfunded(retrain=retrain, policy=policy, left=left, runtime_s=runtime_s)
    challenger = retrain.challenger
    spec = JobSpec(
        kind=Job.Kind.EVALUATE,
        recipe=get_recipe(challenger.recipe_name),
        parameters=evaluation_parameters(retrain=retrain, policy=policy),
        dataset_version=retrain.job.input_dataset_version,
        model_version=challenger,
    )
    options = JobOptions(
        resource_class=retrain.job.resource_class,
        gpu_count=EVALUATE_GPUS,
        max_runtime_s=runtime_s,
        labels={"deployment": retrain.deployment.name, "loop": "evaluate"},
    )
    job, _created = job_admit(
        organization=retrain.organization,
        actor=loop_actor(retrain.deployment),
        spec=spec,
        options=options,
        idempotency_key=f"loop-evaluate-{retrain.pk}",
    )
    retrain.evaluation_job, retrain.state = job, Retrain.State.EVALUATING
    retrain.save(update_fields=["evaluation_job", "state"])
    return retrain


def evaluation_result(job: Job) -> dict | None:
    """The evaluate job's result, from its last attempt's `evaluation` event."""
    event = (
        JobEvent.objects.for_organization(job.organization)
        .filter(job=job, kind=EVALUATION_EVENT)
        .order_by("-attempt", "-pk")
        .first()
    )
    return event.data if event is not None else None


def _worse_by(challenger: float, champion: float, higher_is_better: bool) -> float:
    return champion - challenger if higher_is_better else challenger - champion


def gate_judge(
    *, result: dict, higher_is_better: bool, margin: float, slice_tolerance: float
) -> tuple[bool, list[str]]:
    """Pass when the challenger beats the champion overall by `margin` and no slice of the
    champion's is worse by more than `slice_tolerance`; the reasons say why, either way.

    Both are absolute differences in the metric's own units, in the direction that is better:
    with accuracy the challenger's must be at least `margin` higher, with an error such as MAE
    at least `margin` lower, and a slice's accuracy may be at most `slice_tolerance` lower (its
    error at most that much higher) than the champion's."""
    metric = result.get("metric", "metric")
    challenger, champion = result.get("challenger") or {}, result.get("champion") or {}
    new, old = challenger.get("overall"), champion.get("overall")
    if not isinstance(new, int | float) or not isinstance(old, int | float):
        return False, [f"the evaluation has no overall {metric} for both versions"]
    reasons, passed = [], True
    gain = -_worse_by(new, old, higher_is_better)
    if gain >= margin:
        reasons.append(
            f"{metric} {new:.4f} vs champion {old:.4f}: better by {gain:.4f} >= {margin:g}"
        )
    else:
        passed = False
        reasons.append(
            f"{metric} {new:.4f} vs champion {old:.4f}: better by {gain:.4f}, "
            f"not the {margin:g} the gate asks"
        )
    new_slices = challenger.get("slices") or {}
    for value, old_score in sorted((champion.get("slices") or {}).items()):
        new_score = new_slices.get(value)
        if not isinstance(new_score, int | float) or not isinstance(old_score, int | float):
            continue
        worse = _worse_by(new_score, old_score, higher_is_better)
        if worse > slice_tolerance:
            passed = False
            reasons.append(
                f"slice {result.get('slice_column')}={value}: {metric} {new_score:.4f} vs "
                f"champion {old_score:.4f}, worse by {worse:.4f} > {slice_tolerance:g}"
            )
    return passed, reasons


def _lineage(retrain: Retrain) -> dict:
    challenger = retrain.challenger
    trained_on = list(challenger.trained_on.select_related("dataset")) or [
        retrain.job.input_dataset_version
    ]
    evaluated_on = None  # none ran when the spending limit was spent
    if retrain.evaluation_job_id is not None:
        version = retrain.job.input_dataset_version
        evaluated_on = {
            "dataset": version.dataset.name,
            "version": version.number,
            "split": "validation",
        }
    return {
        "datasets": [
            {"dataset": v.dataset.name, "version": v.number, "id": v.pk} for v in trained_on
        ],
        "parent_version": challenger.parent_version_id,
        "champion": retrain.champion_id,
        "training_job": retrain.job_id,
        "evaluation_job": retrain.evaluation_job_id,
        "evaluated_on": evaluated_on,
        "trigger": retrain.trigger,
    }


def _card_write(
    *,
    retrain: Retrain,
    policy: RetrainPolicy,
    passed: bool,
    reasons: list[str],
    result: dict,
    job: Job | None,
) -> ModelCard:
    """The gate's decision: the challenger's model card and its timeline row (with the
    evaluate job's cost, if one ran) and audit event."""
    _metric, higher = live_metric_of(retrain.deployment.recipe)
    card = ModelCard.objects.create(
        organization=retrain.organization,
        model_version=retrain.challenger,
        retrain=retrain,
        champion=retrain.champion,
        lineage=_lineage(retrain),
        metrics={
            "metric": result.get("metric"),
            "higher_is_better": higher,
            "slice_column": policy.slice_column,
            "rows": result.get("rows"),
            "challenger": result.get("challenger"),
            "champion": result.get("champion"),
            "gate_margin": policy.gate_margin,
            "slice_tolerance": policy.slice_tolerance,
        },
        decision=ModelCard.Decision.PASSED if passed else ModelCard.Decision.FAILED,
        reasons=reasons,
    )
    loop_step_record(
        deployment=retrain.deployment,
        kind=LoopEvent.Kind.GATE_PASSED if passed else LoopEvent.Kind.GATE_FAILED,
        message=f"{retrain.challenger} against {retrain.champion}: " + "; ".join(reasons),
        data={"retrain": retrain.pk, "model_card": card.pk, "reasons": reasons},
        job=job,
        model_version=retrain.challenger,
        cost_minor=job.cost_minor if job else 0,
        target=card,
    )
    return card


def _gate_fail_unfunded(
    *, retrain: Retrain, policy: RetrainPolicy, left: int, runtime_s: int
) -> Retrain:
    """The training job spent (nearly) all of the retrain's spending limit: nothing pays for
    the evaluation, and an unevaluated challenger never goes live."""
    reason = (
        f"the spending limit of {policy.max_cost_minor} minor units per retrain is spent: the "
        f"training job cost {retrain.job.cost_minor}, leaving {max(left, 0)}, which buys "
        f"{runtime_s} s of evaluation on {retrain.job.resource_class}, under the "
        f"{MIN_RUNTIME_S} s a job needs"
    )
    _card_write(retrain=retrain, policy=policy, passed=False, reasons=[reason], result={}, job=None)
    retrain.state, retrain.finished_at = Retrain.State.REJECTED, timezone.now()
    retrain.save(update_fields=["state", "finished_at"])
    return retrain


def gate_decide(*, retrain: Retrain, policy: RetrainPolicy) -> Retrain:
    """Once the evaluate job has ended: judge, write the model card, and move on (a canary, a
    person's approval, or rejection). A failed evaluation rejects the challenger."""
    job = Job.objects.for_organization(retrain.organization).get(pk=retrain.evaluation_job_id)
    if not job.is_terminal:
        return retrain
    deployment = retrain.deployment
    _metric, higher = live_metric_of(deployment.recipe)
    result = evaluation_result(job) if job.state == Job.State.SUCCEEDED else None
    if result is None:
        passed = False
        reasons = [f"the evaluation job {job.pk} ended {job.state} without a result"]
        result = {}
    else:
        passed, reasons = gate_judge(
            result=result,
            higher_is_better=higher,
            margin=policy.gate_margin,
            slice_tolerance=policy.slice_tolerance,
        )
    card = _card_write(
        retrain=retrain, policy=policy, passed=passed, reasons=reasons, result=result, job=job
    )
    if not passed:
        retrain.state, retrain.finished_at = Retrain.State.REJECTED, timezone.now()
        retrain.save(update_fields=["state", "finished_at"])
        return retrain
    if not policy.auto_promote:
        retrain.state = Retrain.State.AWAITING_APPROVAL
        retrain.save(update_fields=["state"])
        return retrain
    return _approve(
        retrain=retrain,
        card=card,
        policy=policy,
        actor=loop_actor(deployment),
        via="policy",
        label=f"the retrain policy of {deployment.name} (auto_promote)",
    )


def _approve(
    *, retrain: Retrain, card: ModelCard, policy: RetrainPolicy, actor: Actor, via: str, label: str
) -> Retrain:
    card.approved_via, card.approved_by, card.approved_by_label = via, actor.user, label
    card.approved_at = timezone.now()
    if via == "policy":
        card.approved_by = None
    card.save(update_fields=["approved_via", "approved_by", "approved_by_label", "approved_at"])
    loop_step_record(
        deployment=retrain.deployment,
        kind=LoopEvent.Kind.APPROVED,
        message=f"{retrain.challenger} approved for a canary by {label}.",
        data={"retrain": retrain.pk, "model_card": card.pk, "by": via, "approver": label},
        model_version=retrain.challenger,
        actor=actor,
        target=card,
    )
    return rollout_start(retrain=retrain, policy=policy, actor=actor)


def _awaiting(*, card: ModelCard, actor: Actor, verb: str) -> tuple[Retrain, ModelCard]:
    """The locked retrain of a card a person decides on, once the actor may decide."""
    if PROMOTE_SCOPE not in actor_scopes(organization=card.organization, actor=actor):
        raise PermissionDeniedError(f"{verb} a challenger needs the {PROMOTE_SCOPE} scope.")
    Deployment.objects.select_for_update(no_key=True).get(pk=card.retrain.deployment_id)
    retrain = Retrain.objects.select_for_update().get(pk=card.retrain_id)
    card = ModelCard.objects.get(pk=card.pk)
    if card.decision != ModelCard.Decision.PASSED:
        raise ConflictError("This challenger failed the gate; there is nothing to decide.")
    if retrain.state not in Retrain.AWAITING_DECISION_STATES:
        raise ConflictError(
            f"This challenger is not awaiting a person's decision (it is {retrain.state})."
        )
    return retrain, card


def _inconclusive_decide(
    *, retrain: Retrain, card: ModelCard, actor: Actor, promote: bool, reason: str = ""
) -> Retrain:
    """The decision goes on the model card beside the gate's, then the rollout carries it out."""
    done = "promoted" if promote else "rolled back"
    card.reasons = [
        *card.reasons,
        f"canary inconclusive; {done} by {actor.label}" + (f": {reason}" if reason else ""),
    ]
    card.save(update_fields=["reasons"])
    return rollout_decide(retrain=retrain, actor=actor, promote=promote, reason=reason)


def gate_approve(*, card: ModelCard, actor: Actor) -> Retrain:
    """A person lets a challenger that passed the gate into a canary, or promotes an
    inconclusive canary to 100%: needs `models:promote` in the card's organization (anyone
    else, another organization's member or key included, is refused), and only while the
    retrain awaits that decision."""
    with transaction.atomic():
        retrain, card = _awaiting(card=card, actor=actor, verb="Approving")
        if retrain.state == Retrain.State.INCONCLUSIVE:
            return _inconclusive_decide(retrain=retrain, card=card, actor=actor, promote=True)
        policy = (
            RetrainPolicy.objects.for_organization(retrain.organization)
            .filter(deployment_id=retrain.deployment_id)
            .first()
        )
        if policy is None:
            raise DomainError("The deployment has no retrain policy any more.")
        return _approve(
            retrain=retrain, card=card, policy=policy, actor=actor, via="user", label=actor.label
        )


@transaction.atomic
def gate_reject(*, card: ModelCard, actor: Actor, reason: str = "") -> Retrain:
    """A person turns down a challenger awaiting approval, or rolls back an inconclusive canary
    (same scope as approving), which frees the deployment for its next retrain."""
    retrain, card = _awaiting(card=card, actor=actor, verb="Rejecting")
    reason = reason[:500]
    if retrain.state == Retrain.State.INCONCLUSIVE:
        return _inconclusive_decide(
            retrain=retrain, card=card, actor=actor, promote=False, reason=reason
        )
    retrain.state, retrain.finished_at = Retrain.State.REJECTED, timezone.now()
    retrain.save(update_fields=["state", "finished_at"])
    card.reasons = [*card.reasons, f"rejected by {actor.label}" + (f": {reason}" if reason else "")]
    card.save(update_fields=["reasons"])
    loop_step_record(
        deployment=retrain.deployment,
        kind=LoopEvent.Kind.GATE_FAILED,
        message=f"{retrain.challenger} passed the gate but was rejected by {actor.label}.",
        data={"retrain": retrain.pk, "model_card": card.pk, "by": "user", "reason": reason},
        model_version=retrain.challenger,
        actor=actor,
        target=card,
    )
    return retrain
