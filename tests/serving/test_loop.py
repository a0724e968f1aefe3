"""The factory loop's state machine on the real database: retrain triggers, the spending limit,
the evaluation gate and its model card, approval, canary steps, promotion and rollback. Jobs are
rows finished by hand here; tests/serving/test_loop_evaluate.py runs a real evaluate job."""

from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from jobs.models import Job, JobEvent, ResourceClass
from registry.models import ModelAlias
from serving.gate import gate_approve, gate_judge, gate_reject
from serving.loop import loop_advance, loop_tick_all, retrain_trigger
from serving.models import (
    Deployment,
    DriftReport,
    LoopEvent,
    ModelCard,
    PredictionLog,
    Replica,
    Retrain,
    RetrainPolicy,
    Route,
)
from serving.policies import retrain_policy_set
from serving.timeline import loop_actor
from tenants.actors import Actor
from tenants.errors import ConflictError, PermissionDeniedError
from tenants.models import AuditEvent
from tenants.selectors import actor_scopes
from tenants.services import api_key_create, api_key_revoke
from tests.factories import DatasetVersionFactory, JobFactory, ModelVersionFactory

PARAMS = {"target": "y", "epochs": 2}


@pytest.fixture
def cpu(db):
    return ResourceClass.objects.get(name="cpu")


@pytest.fixture
def creator(org, member_factory):
    return member_factory(org, "developer")


@pytest.fixture
def data(org):
    return DatasetVersionFactory(organization=org)


@pytest.fixture
def champion(org, data):
    version = ModelVersionFactory(
        organization=org, recipe_name="tabular-classifier", parameters=PARAMS
    )
    version.trained_on.add(data)
    return version


@pytest.fixture
def deployment(org, cpu, creator, champion):
    deployment = Deployment.objects.create(
        organization=org,
        name="churn",
        recipe="tabular-classifier",
        resource_class=cpu,
        created_by=creator,
        created_at=timezone.now() - timedelta(days=1),
    )
    Route.objects.create(
        organization=org, deployment=deployment, model_version=champion, weight=100
    )
    return deployment


@pytest.fixture
def policy(deployment, data):
    return RetrainPolicy.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        dataset=data.dataset,
        cooldown_s=3600,
        max_cost_minor=1000,
        slice_column="region",
        slice_tolerance=0.05,
        gate_margin=0.01,
        canary_percent=10,
        bake_s=600,
    )


def _drift(deployment, champion, at=None):
    at = at or timezone.now()
    return DriftReport.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        model_version=champion,
        window_start=at - timedelta(minutes=10),
        window_end=at,
        rows=1000,
        drifted=True,
        drifted_share=0.6,
        created_at=at,
    )


def _finish(job, *, state=Job.State.SUCCEEDED, cost=0, **fields):
    Job.objects.filter(pk=job.pk).update(
        state=state, finished_at=timezone.now(), cost_minor=cost, **fields
    )


def _events(deployment):
    return list(
        LoopEvent.objects.filter(deployment=deployment)
        .order_by("pk")
        .values_list("kind", flat=True)
    )


def _evaluation(job, *, challenger, champion, challenger_slices, champion_slices):
    JobEvent.objects.create(
        organization=job.organization,
        job=job,
        attempt=job.attempt,
        kind="evaluation",
        data={
            "metric": "accuracy",
            "rows": 200,
            "slice_column": "region",
            "challenger": {"overall": challenger, "slices": challenger_slices},
            "champion": {"overall": champion, "slices": champion_slices},
        },
    )


def _trained(deployment, champion, *, cost=250):
    """Drift -> retrain submitted -> its job succeeded at `cost` with a challenger -> the tick
    that follows (which queues the evaluation when the spending limit leaves room for it)."""
    _drift(deployment, champion)
    retrain = loop_advance(deployment_id=deployment.pk)
    challenger = ModelVersionFactory(
        organization=deployment.organization,
        registered_model=champion.registered_model,
        recipe_name="tabular-classifier",
        parameters=PARAMS,
    )
    challenger.trained_on.add(retrain.job.input_dataset_version)
    _finish(retrain.job, cost=cost, output_model_version=challenger)
    return loop_advance(deployment_id=deployment.pk), challenger


def _to_evaluating(deployment, champion, policy):
    retrain, challenger = _trained(deployment, champion)
    assert retrain.state == Retrain.State.EVALUATING
    return retrain, challenger


def _to_canary(deployment, champion, policy):
    retrain, challenger = _to_evaluating(deployment, champion, policy)
    _evaluation(
        retrain.evaluation_job,
        challenger=0.91,
        champion=0.85,
        challenger_slices={"eu": 0.9, "us": 0.92},
        champion_slices={"eu": 0.86, "us": 0.84},
    )
    _finish(retrain.evaluation_job, cost=40)
    retrain = loop_advance(deployment_id=deployment.pk)
    assert retrain.state == Retrain.State.CANARY
    return retrain, challenger


def _traffic(deployment, version, *, at, n=40, errors=0, latency=10.0, right=None):
    """`n` logged live predictions of `version` at `at`, the first `errors` failed; labelled, the
    first `right` of them correctly (all, when None)."""
    right = n if right is None else right
    PredictionLog.objects.bulk_create(
        PredictionLog(
            organization=deployment.organization,
            deployment=deployment,
            model_version=version,
            inputs={"x": i},
            output=None if i < errors else {"label": "a"},
            error="boom" if i < errors else "",
            latency_ms=latency,
            created_at=at,
            label="a" if i < right else "b",
        )
        for i in range(n)
    )


def _routes(deployment):
    return {
        (r.model_version_id, r.weight, r.stage)
        for r in Route.objects.filter(deployment=deployment, mode=Route.Mode.LIVE)
    }


def test_drift_submits_one_retrain_as_the_policy_and_the_cooldown_holds_the_next(
    deployment, policy, champion, creator, data
):
    _drift(deployment, champion)
    retrain = loop_advance(deployment_id=deployment.pk)

    job = retrain.job
    assert retrain.state == Retrain.State.TRAINING and retrain.trigger["trigger"] == "drift"
    assert (job.kind, job.recipe, job.input_dataset_version, job.parameters["epochs"]) == (
        Job.Kind.TRAIN,
        "tabular-classifier",
        data,
        2,
    )
    assert job.output_model_name == champion.registered_model.name
    assert job.created_by == creator
    submitted = LoopEvent.objects.get(deployment=deployment, kind=LoopEvent.Kind.RETRAIN_SUBMITTED)
    assert submitted.job == job
    audit = AuditEvent.objects.get(action="serving.loop.retrain_submitted")
    assert audit.data["by"] == "policy" and audit.data["job"] == job.pk

    # Still training: new drift does not start a second retrain.
    _drift(deployment, champion)
    assert loop_advance(deployment_id=deployment.pk) == retrain
    assert Retrain.objects.filter(deployment=deployment).count() == 1

    # The job fails: its cost lands on the timeline; the cooldown holds off the next drift.
    _finish(job, state=Job.State.FAILED, cost=321)
    loop_advance(deployment_id=deployment.pk)
    submitted.refresh_from_db()
    assert submitted.cost_minor == 321
    failed = LoopEvent.objects.get(deployment=deployment, kind=LoopEvent.Kind.RETRAIN_FAILED)
    assert failed.cost_minor == 321
    _drift(deployment, champion)
    assert loop_advance(deployment_id=deployment.pk) is None
    assert Job.objects.filter(kind=Job.Kind.TRAIN).count() == 1

    # After the cooldown the next drifted window retrains again.
    later = timezone.now() + timedelta(seconds=policy.cooldown_s + 1)
    _drift(deployment, champion, at=later)
    assert loop_advance(deployment_id=deployment.pk, now=later).state == Retrain.State.TRAINING
    assert Job.objects.filter(kind=Job.Kind.TRAIN).count() == 2


def test_two_retrains_of_one_deployment_cannot_be_active(deployment, champion, org):
    job = JobFactory(organization=org)
    Retrain.objects.create(organization=org, deployment=deployment, job=job, champion=champion)
    with pytest.raises(IntegrityError), transaction.atomic():
        Retrain.objects.create(organization=org, deployment=deployment, job=job, champion=champion)


def test_ticking_twice_with_nothing_new_changes_nothing(deployment, policy, champion):
    _drift(deployment, champion)
    loop_tick_all()
    loop_tick_all()
    assert Retrain.objects.count() == 1
    assert _events(deployment) == [LoopEvent.Kind.RETRAIN_SUBMITTED]


def test_a_spending_limit_too_small_for_a_minute_skips_with_the_reason(
    deployment, policy, champion
):
    policy.max_cost_minor = 0
    policy.save()
    _drift(deployment, champion)
    assert loop_advance(deployment_id=deployment.pk) is None

    skipped = LoopEvent.objects.get(deployment=deployment, kind=LoopEvent.Kind.RETRAIN_SKIPPED)
    assert "spending limit of 0" in skipped.message
    assert not Job.objects.filter(kind=Job.Kind.TRAIN).exists()
    assert AuditEvent.objects.filter(action="serving.loop.retrain_skipped").exists()
    # The skip counts as the trigger: the cooldown keeps it from repeating every tick.
    assert loop_advance(deployment_id=deployment.pk) is None
    assert LoopEvent.objects.filter(kind=LoopEvent.Kind.RETRAIN_SKIPPED).count() == 1


def test_the_spending_limit_caps_the_retrain_runtime(deployment, policy, champion):
    """The cpu class costs 0.00002 USD per second (0.002 cents): 1 cent buys 500 seconds."""
    policy.max_cost_minor = 1
    policy.save()
    _drift(deployment, champion)
    retrain = loop_advance(deployment_id=deployment.pk)
    assert retrain.job.max_runtime_s == 500
    submitted = LoopEvent.objects.get(kind=LoopEvent.Kind.RETRAIN_SUBMITTED)
    assert submitted.data["max_cost_minor"] <= 1


def test_the_evaluation_runs_on_what_training_left_of_the_spending_limit(
    deployment, policy, champion, settings
):
    """1000 cents per retrain, the training cost 999: the cent left buys 500 s of the cpu class
    (0.002 cents a second), under the evaluation's own cap."""
    settings.SERVING_LOOP_EVALUATE_MAX_RUNTIME_S = 900
    retrain, _challenger = _trained(deployment, champion, cost=999)
    assert retrain.state == Retrain.State.EVALUATING
    assert retrain.evaluation_job.max_runtime_s == 500


@pytest.mark.parametrize("training_cost", [1000, 1300], ids=["spent", "overspent"])
def test_a_retrain_whose_training_spent_the_limit_fails_the_gate_unevaluated(
    deployment, policy, champion, training_cost
):
    retrain, challenger = _trained(deployment, champion, cost=training_cost)

    assert retrain.state == Retrain.State.REJECTED and retrain.finished_at
    assert retrain.evaluation_job is None
    assert not Job.objects.filter(kind=Job.Kind.EVALUATE).exists()
    card = ModelCard.objects.get(retrain=retrain, model_version=challenger)
    assert card.decision == ModelCard.Decision.FAILED
    (reason,) = card.reasons
    assert "spending limit of 1000" in reason and f"cost {training_cost}" in reason
    assert card.lineage["evaluation_job"] is None and card.lineage["evaluated_on"] is None
    failed = LoopEvent.objects.get(deployment=deployment, kind=LoopEvent.Kind.GATE_FAILED)
    assert reason in failed.message and failed.cost_minor == 0
    assert AuditEvent.objects.filter(action="serving.loop.gate_failed").exists()
    assert _routes(deployment) == {(champion.pk, 100, Route.Stage.STABLE)}
    # Over: the next tick leaves the rejected retrain alone.
    assert loop_advance(deployment_id=deployment.pk) is None


def test_a_live_accuracy_below_the_threshold_triggers_but_a_good_one_does_not(
    deployment, policy, champion
):
    policy.on_drift, policy.metric_below = False, 0.8
    policy.save()
    now = timezone.now()
    _traffic(deployment, champion, at=now - timedelta(minutes=5), n=40, right=36)  # 0.9
    assert retrain_trigger(policy=policy, champion=champion, now=now) is None
    _traffic(deployment, champion, at=now - timedelta(minutes=4), n=40, right=0)  # now 0.45
    trigger = retrain_trigger(policy=policy, champion=champion, now=now)
    assert trigger["trigger"] == "metric" and trigger["value"] == pytest.approx(0.45)


def test_a_forecasters_error_above_the_threshold_is_worse_not_better(deployment, policy, champion):
    """MAE is lower-is-better: `metric_below` means "worse than", i.e. an error above it."""
    Deployment.objects.filter(pk=deployment.pk).update(recipe="timeseries-forecaster")
    deployment.refresh_from_db()
    policy.deployment, policy.on_drift, policy.metric_below = deployment, False, 1.0
    now = timezone.now()
    rows = [
        PredictionLog(
            organization=deployment.organization,
            deployment=deployment,
            model_version=champion,
            inputs={},
            output={"forecast": [1.0, 1.0]},
            latency_ms=5,
            created_at=now - timedelta(minutes=1),
            label=[1.5, 1.5] if i < 35 else [10.0, 10.0],
        )
        for i in range(40)
    ]
    PredictionLog.objects.bulk_create(rows[:35])
    assert retrain_trigger(policy=policy, champion=champion, now=now) is None  # MAE 0.5
    PredictionLog.objects.bulk_create(rows[35:])
    trigger = retrain_trigger(policy=policy, champion=champion, now=now)
    assert trigger["value"] > 1.0


def test_a_new_dataset_version_and_the_schedule_trigger(deployment, policy, champion, data):
    policy.on_drift, policy.on_new_data = False, True
    now = timezone.now()
    assert retrain_trigger(policy=policy, champion=champion, now=now) is None
    newer = DatasetVersionFactory(organization=deployment.organization, dataset=data.dataset)
    assert retrain_trigger(policy=policy, champion=champion, now=now) == {
        "trigger": "new_data",
        "dataset_version": newer.pk,
        "number": newer.number,
    }
    policy.on_new_data, policy.every_s = False, 3600
    policy.last_triggered_at = now - timedelta(hours=2)
    assert retrain_trigger(policy=policy, champion=champion, now=now)["trigger"] == "schedule"
    policy.last_triggered_at = now - timedelta(minutes=30)
    assert retrain_trigger(policy=policy, champion=champion, now=now) is None


def test_a_passing_challenger_gets_a_model_card_and_a_canary(deployment, policy, champion, data):
    retrain, challenger = _to_canary(deployment, champion, policy)

    evaluate = retrain.evaluation_job
    assert (evaluate.kind, evaluate.input_model_version, evaluate.input_dataset_version) == (
        Job.Kind.EVALUATE,
        challenger,
        data,
    )
    assert evaluate.parameters["champion_model_version"] == champion.pk
    card = ModelCard.objects.get(model_version=challenger)
    assert card.decision == ModelCard.Decision.PASSED
    assert card.metrics["challenger"]["slices"]["eu"] == 0.9
    assert card.metrics["champion"]["overall"] == 0.85
    assert card.lineage["datasets"] == [
        {"dataset": data.dataset.name, "version": data.number, "id": data.pk}
    ]
    assert card.lineage["training_job"] == retrain.job_id
    assert card.approved_via == "policy" and card.approved_by is None and card.approved_at
    assert _routes(deployment) == {
        (champion.pk, 90, Route.Stage.STABLE),
        (challenger.pk, 10, Route.Stage.CANARY),
    }
    assert _events(deployment) == [
        LoopEvent.Kind.RETRAIN_SUBMITTED,
        LoopEvent.Kind.GATE_PASSED,
        LoopEvent.Kind.APPROVED,
        LoopEvent.Kind.CANARY_STARTED,
    ]
    costs = dict(LoopEvent.objects.filter(deployment=deployment).values_list("kind", "cost_minor"))
    assert costs[LoopEvent.Kind.RETRAIN_SUBMITTED] == 250
    assert costs[LoopEvent.Kind.GATE_PASSED] == 40
    assert AuditEvent.objects.filter(
        action="deployment.routes_set", data__step="canary_start"
    ).exists()


def test_a_challenger_worse_on_one_slice_fails_the_gate(deployment, policy, champion):
    retrain, challenger = _to_evaluating(deployment, champion, policy)
    _evaluation(
        retrain.evaluation_job,
        challenger=0.93,
        champion=0.85,
        challenger_slices={"eu": 0.97, "us": 0.70},
        champion_slices={"eu": 0.86, "us": 0.84},
    )
    _finish(retrain.evaluation_job, cost=40)
    retrain = loop_advance(deployment_id=deployment.pk)

    assert retrain.state == Retrain.State.REJECTED
    card = ModelCard.objects.get(model_version=challenger)
    assert card.decision == ModelCard.Decision.FAILED
    assert any("region=us" in reason for reason in card.reasons)
    failed = LoopEvent.objects.get(kind=LoopEvent.Kind.GATE_FAILED)
    assert failed.cost_minor == 40 and "region=us" in failed.message
    assert _routes(deployment) == {(champion.pk, 100, Route.Stage.STABLE)}


def test_a_challenger_that_does_not_beat_the_margin_fails_and_a_failed_evaluation_too(
    deployment, policy, champion
):
    passed, reasons = gate_judge(
        result={
            "metric": "accuracy",
            "challenger": {"overall": 0.855},
            "champion": {"overall": 0.85},
        },
        higher_is_better=True,
        margin=0.01,
        slice_tolerance=0.05,
    )
    assert not passed and "not the 0.01" in reasons[0]
    passed, _ = gate_judge(
        result={"metric": "mae", "challenger": {"overall": 0.4}, "champion": {"overall": 0.5}},
        higher_is_better=False,
        margin=0.05,
        slice_tolerance=0.05,
    )
    assert passed

    retrain, _challenger = _to_evaluating(deployment, champion, policy)
    _finish(retrain.evaluation_job, state=Job.State.FAILED, cost=7)
    assert loop_advance(deployment_id=deployment.pk).state == Retrain.State.REJECTED
    assert LoopEvent.objects.get(kind=LoopEvent.Kind.GATE_FAILED).cost_minor == 7


@pytest.fixture
def awaiting(deployment, policy, champion):
    policy.auto_promote = False
    policy.save()
    retrain, _challenger = _to_evaluating(deployment, champion, policy)
    _evaluation(
        retrain.evaluation_job,
        challenger=0.91,
        champion=0.85,
        challenger_slices={},
        champion_slices={},
    )
    _finish(retrain.evaluation_job)
    retrain = loop_advance(deployment_id=deployment.pk)
    assert retrain.state == Retrain.State.AWAITING_APPROVAL
    assert _routes(deployment) == {(champion.pk, 100, Route.Stage.STABLE)}
    return ModelCard.objects.get(retrain=retrain)


def test_approval_needs_models_promote_in_the_cards_organization(
    awaiting, org, other_org, member_factory, deployment
):
    viewer = member_factory(org, "viewer")
    stranger = member_factory(other_org, "owner")
    key, _token = api_key_create(
        organization=other_org,
        name="theirs",
        scopes=["models:promote", "models:read"],
        actor=Actor(user=stranger),
    )
    own_key, _token = api_key_create(
        organization=org,
        name="read only",
        scopes=["models:read"],
        actor=Actor(user=member_factory(org, "owner")),
    )
    for attacker in (
        Actor(user=viewer),
        Actor(user=stranger),
        Actor(api_key=key),
        Actor(api_key=own_key),
        Actor(),
    ):
        with pytest.raises(PermissionDeniedError):
            gate_approve(card=awaiting, actor=attacker)
    awaiting.refresh_from_db()
    assert awaiting.approved_at is None
    assert not LoopEvent.objects.filter(kind=LoopEvent.Kind.APPROVED).exists()

    approver = member_factory(org, "developer")
    retrain = gate_approve(card=awaiting, actor=Actor(user=approver))
    assert retrain.state == Retrain.State.CANARY
    awaiting.refresh_from_db()
    assert (awaiting.approved_via, awaiting.approved_by) == ("user", approver)
    approved = AuditEvent.objects.get(action="serving.loop.approved")
    assert approved.actor_user == approver and approved.data["by"] == "user"


def _bake(deployment, retrain, policy, **traffic):
    """Traffic for both versions over the current bake; returns the time the bake is over."""
    at = retrain.step_started_at + timedelta(seconds=1)
    stable = {k.removeprefix("stable_"): v for k, v in traffic.items() if k.startswith("stable_")}
    canary = {k: v for k, v in traffic.items() if not k.startswith("stable_")}
    _traffic(deployment, retrain.champion, at=at, **stable)
    _traffic(deployment, retrain.challenger, at=at, **canary)
    return retrain.step_started_at + timedelta(seconds=policy.bake_s + 1)


def test_a_healthy_canary_steps_up_and_is_promoted(deployment, policy, champion, cpu):
    retrain, challenger = _to_canary(deployment, champion, policy)
    replica_job = JobFactory(organization=deployment.organization, kind=Job.Kind.SERVE)
    Replica.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        model_version=challenger,
        job=replica_job,
        created_at=retrain.step_started_at - timedelta(seconds=5),
    )

    # Not baked yet: nothing moves.
    early = retrain.step_started_at + timedelta(seconds=policy.bake_s - 1)
    assert loop_advance(deployment_id=deployment.pk, now=early).canary_percent == 10

    done = _bake(deployment, retrain, policy)
    retrain = loop_advance(deployment_id=deployment.pk, now=done)
    assert retrain.canary_percent == 50
    assert _routes(deployment) == {
        (champion.pk, 50, Route.Stage.STABLE),
        (challenger.pk, 50, Route.Stage.CANARY),
    }
    stepped = LoopEvent.objects.get(kind=LoopEvent.Kind.CANARY_STEPPED)
    # 601 s of one cpu replica at 0.002 cents a second.
    assert stepped.cost_minor == 2
    assert stepped.data["canary"]["requests"] == 40

    done = _bake(deployment, retrain, policy)
    retrain = loop_advance(deployment_id=deployment.pk, now=done)
    assert retrain.state == Retrain.State.PROMOTED
    assert _routes(deployment) == {(challenger.pk, 100, Route.Stage.STABLE)}
    alias = ModelAlias.objects.get(registered_model=challenger.registered_model, name="production")
    assert alias.version == challenger
    assert _events(deployment)[-2:] == [LoopEvent.Kind.CANARY_STEPPED, LoopEvent.Kind.PROMOTED]
    # Every step of the turn is audited, with its cost beside it (the retrain's own cost is
    # known only when its job ends, and lands on its timeline row then).
    for event in LoopEvent.objects.filter(deployment=deployment).exclude(
        kind=LoopEvent.Kind.RETRAIN_SUBMITTED
    ):
        audit = AuditEvent.objects.get(action=f"serving.loop.{event.kind}")
        assert audit.data["cost_minor"] == event.cost_minor
    assert AuditEvent.objects.filter(action="deployment.routes_set").count() == 3


@pytest.mark.parametrize(
    ("canary", "reason"),
    [
        ({"errors": 5}, "error rate"),
        ({"latency": 40.0}, "p99"),
        ({"right": 30}, "live metric"),
    ],
    ids=["errors", "latency", "metric"],
)
def test_a_canary_made_worse_is_rolled_back(deployment, policy, champion, canary, reason):
    retrain, _challenger = _to_canary(deployment, champion, policy)
    done = _bake(deployment, retrain, policy, **canary)
    retrain = loop_advance(deployment_id=deployment.pk, now=done)

    assert retrain.state == Retrain.State.ROLLED_BACK
    assert _routes(deployment) == {(champion.pk, 100, Route.Stage.STABLE)}
    rolled = LoopEvent.objects.get(kind=LoopEvent.Kind.ROLLED_BACK)
    assert reason in rolled.message
    assert rolled.data["canary"]["requests"] == 40 and rolled.data["stable"]["requests"] == 40
    assert AuditEvent.objects.filter(action="serving.loop.rolled_back").exists()
    assert AuditEvent.objects.filter(action="deployment.routes_set", data__step="rollback").exists()
    # Over: the next tick does nothing more to it.
    assert loop_advance(deployment_id=deployment.pk, now=done) is None


def test_a_canary_with_too_little_traffic_keeps_baking(deployment, policy, champion):
    retrain, _challenger = _to_canary(deployment, champion, policy)
    done = _bake(deployment, retrain, policy, n=5, errors=5, stable_n=5)
    retrain = loop_advance(deployment_id=deployment.pk, now=done)
    assert (retrain.state, retrain.canary_percent) == (Retrain.State.CANARY, 10)


def test_a_canary_too_quiet_over_its_extended_bakes_pauses_inconclusive_and_is_not_promoted(
    deployment, policy, champion, settings
):
    """A 600 s bake extended twice: a canary that saw 5 of the 30 requests its judgment needs is
    still baking just before the third bake ends, and pauses as inconclusive at it, keeping its
    share; nothing promotes it on no evidence, however long it waits."""
    settings.SERVING_LOOP_MIN_SAMPLES = 30
    policy.bake_extensions = 2
    policy.save()
    retrain, challenger = _to_canary(deployment, champion, policy)
    started = retrain.step_started_at
    _traffic(deployment, challenger, at=started + timedelta(seconds=1), n=5)
    _traffic(deployment, champion, at=started + timedelta(seconds=1), n=45)

    for seconds in (601, 1201, 1799):
        retrain = loop_advance(
            deployment_id=deployment.pk, now=started + timedelta(seconds=seconds)
        )
        assert (retrain.state, retrain.canary_percent) == (Retrain.State.CANARY, 10), seconds
    paused_at = started + timedelta(seconds=1800)
    retrain = loop_advance(deployment_id=deployment.pk, now=paused_at)

    assert (retrain.state, retrain.canary_percent) == (Retrain.State.INCONCLUSIVE, 10)
    canary_split = {(champion.pk, 90, Route.Stage.STABLE), (challenger.pk, 10, Route.Stage.CANARY)}
    assert _routes(deployment) == canary_split
    paused = LoopEvent.objects.get(deployment=deployment, kind=LoopEvent.Kind.CANARY_INCONCLUSIVE)
    assert (paused.data["requests"], paused.data["needed"]) == (5, 30)
    assert (paused.data["bake_s"], paused.data["extensions"]) == (600, 2)
    assert "5 requests" in paused.message and "30" in paused.message
    assert "models:promote" in paused.message
    audit = AuditEvent.objects.get(action="serving.loop.canary_inconclusive")
    assert (audit.data["requests"], audit.data["needed"]) == (5, 30)

    # It waits for a person: ticks, even once enough traffic has come, change nothing.
    _traffic(deployment, challenger, at=paused_at + timedelta(seconds=1), n=40)
    _traffic(deployment, champion, at=paused_at + timedelta(seconds=1), n=40)
    later = paused_at + timedelta(days=2)
    assert loop_advance(deployment_id=deployment.pk, now=later).state == (
        Retrain.State.INCONCLUSIVE
    )
    assert _routes(deployment) == canary_split
    assert not LoopEvent.objects.filter(
        kind__in=[LoopEvent.Kind.PROMOTED, LoopEvent.Kind.CANARY_STEPPED]
    ).exists()
    # And the deployment starts no other retrain meanwhile.
    _drift(deployment, champion, at=later)
    assert loop_advance(deployment_id=deployment.pk, now=later) == retrain
    assert Retrain.objects.filter(deployment=deployment).count() == 1


@pytest.fixture
def inconclusive(deployment, policy, champion, settings):
    """A canary paused as inconclusive after its bake and no extension; its model card."""
    settings.SERVING_LOOP_MIN_SAMPLES = 30
    policy.bake_extensions = 0
    policy.save()
    retrain, _challenger = _to_canary(deployment, champion, policy)
    done = _bake(deployment, retrain, policy, n=3, stable_n=3)
    retrain = loop_advance(deployment_id=deployment.pk, now=done)
    assert retrain.state == Retrain.State.INCONCLUSIVE
    return ModelCard.objects.get(retrain=retrain)


def test_only_models_promote_decides_an_inconclusive_canary_and_promoting_serves_it_all(
    inconclusive, org, other_org, member_factory, deployment, champion
):
    challenger = inconclusive.model_version
    for attacker in (
        Actor(user=member_factory(org, "viewer")),
        Actor(user=member_factory(other_org, "owner")),
        Actor(),
    ):
        for decide in (gate_approve, gate_reject):
            with pytest.raises(PermissionDeniedError):
                decide(card=inconclusive, actor=attacker)
    assert Retrain.objects.get(pk=inconclusive.retrain_id).state == Retrain.State.INCONCLUSIVE

    developer = member_factory(org, "developer")
    retrain = gate_approve(card=inconclusive, actor=Actor(user=developer))

    assert (retrain.state, retrain.canary_percent) == (Retrain.State.PROMOTED, 100)
    assert _routes(deployment) == {(challenger.pk, 100, Route.Stage.STABLE)}
    promoted = LoopEvent.objects.get(kind=LoopEvent.Kind.PROMOTED)
    assert promoted.data["by"] == "user" and promoted.data["percent"] == 10
    assert "after an inconclusive canary" in promoted.message
    audit = AuditEvent.objects.get(action="serving.loop.promoted")
    assert audit.actor_user == developer and audit.data["by"] == "user"
    inconclusive.refresh_from_db()
    assert "promoted by" in inconclusive.reasons[-1]
    with pytest.raises(ConflictError):
        gate_reject(card=inconclusive, actor=Actor(user=developer), reason="too late")


def test_a_person_rolls_an_inconclusive_canary_back(
    inconclusive, org, member_factory, deployment, champion
):
    owner = member_factory(org, "owner")
    retrain = gate_reject(card=inconclusive, actor=Actor(user=owner), reason="too quiet to tell")

    assert (retrain.state, retrain.canary_percent) == (Retrain.State.ROLLED_BACK, 0)
    assert _routes(deployment) == {(champion.pk, 100, Route.Stage.STABLE)}
    rolled = LoopEvent.objects.get(kind=LoopEvent.Kind.ROLLED_BACK)
    assert rolled.data["by"] == "user" and "too quiet to tell" in rolled.message
    assert AuditEvent.objects.get(action="serving.loop.rolled_back").actor_user == owner
    inconclusive.refresh_from_db()
    assert inconclusive.reasons[-1].endswith("too quiet to tell")
    # Over: the deployment may retrain again.
    assert loop_advance(deployment_id=deployment.pk) is None
    assert not Retrain.objects.filter(state__in=Retrain.ACTIVE_STATES).exists()


@pytest.mark.django_db(transaction=True)
def test_a_tick_skips_a_deployment_another_tick_holds(deployment, policy, champion):
    """Two ticks at once: the one that finds the deployment locked leaves it to the holder."""
    import threading

    from django.db import connection

    _drift(deployment, champion)
    outcome = {}

    def other_tick():
        try:
            outcome["retrain"] = loop_advance(deployment_id=deployment.pk)
        finally:
            connection.close()

    with transaction.atomic():
        Deployment.objects.select_for_update().get(pk=deployment.pk)
        thread = threading.Thread(target=other_tick)
        thread.start()
        thread.join(timeout=30)
    assert not thread.is_alive() and outcome["retrain"] is None
    assert not Retrain.objects.exists()
    assert loop_advance(deployment_id=deployment.pk).state == Retrain.State.TRAINING


def test_a_person_may_reject_an_awaiting_challenger_and_the_loop_goes_on(
    awaiting, org, member_factory, deployment, champion, other_org
):
    with pytest.raises(PermissionDeniedError):
        gate_reject(card=awaiting, actor=Actor(user=member_factory(other_org, "owner")))
    retrain = gate_reject(
        card=awaiting, actor=Actor(user=member_factory(org, "developer")), reason="not today"
    )
    assert retrain.state == Retrain.State.REJECTED
    assert _routes(deployment) == {(champion.pk, 100, Route.Stage.STABLE)}
    with pytest.raises(ConflictError):
        gate_approve(card=awaiting, actor=Actor(user=member_factory(org, "owner")))


def test_routes_changed_by_hand_during_a_canary_stand_and_the_loop_lets_go(
    deployment, policy, champion
):
    retrain, challenger = _to_canary(deployment, champion, policy)
    Route.objects.filter(deployment=deployment, model_version=challenger).delete()
    Route.objects.filter(deployment=deployment).update(weight=100)
    retrain = loop_advance(deployment_id=deployment.pk)
    assert retrain.state == Retrain.State.FAILED
    assert _routes(deployment) == {(champion.pk, 100, Route.Stage.STABLE)}
    assert LoopEvent.objects.filter(kind=LoopEvent.Kind.RETRAIN_FAILED).exists()


def test_with_the_deployments_creator_gone_a_retrain_is_skipped_saying_why(
    deployment, policy, champion
):
    Deployment.objects.filter(pk=deployment.pk).update(created_by=None)
    _drift(deployment, champion)
    retrain = loop_advance(deployment_id=deployment.pk)
    assert retrain.state == Retrain.State.FAILED and retrain.job is None
    skipped = LoopEvent.objects.get(kind=LoopEvent.Kind.RETRAIN_SKIPPED)
    assert "models:write" in skipped.message
    assert AuditEvent.objects.get(action="serving.loop.retrain_skipped").actor_label == "system"


def test_the_loop_acts_as_whoever_last_saved_the_policy(
    org, deployment, policy, champion, member_factory
):
    lead = member_factory(org, "developer")
    retrain_policy_set(deployment=deployment, actor=Actor(user=lead), cooldown_s=60)
    _drift(deployment, champion)
    retrain = loop_advance(deployment_id=deployment.pk)
    assert retrain.job.created_by == lead
    audit = AuditEvent.objects.get(action="serving.retrain_policy.set")
    assert audit.data["loop_acts_as"] == lead.email


def test_a_policy_saved_through_a_narrow_key_never_gives_the_loop_its_creators_role(
    org, deployment, policy, champion, member_factory
):
    """The attack: a key made only to manage deployments saves the policy so that the loop
    registers models, which the key may not. The loop holds the key's scopes, not its creator's
    developer role, and skips the retrain, saying which scope it lacks; revoking or deleting the
    key leaves it nothing at all."""
    person = member_factory(org, "developer")
    key, _token = api_key_create(
        organization=org,
        name="deploy bot",
        scopes=["deployments:read", "deployments:write"],
        actor=Actor(user=person),
    )
    retrain_policy_set(deployment=deployment, actor=Actor(user=person, api_key=key), cooldown_s=60)
    _drift(deployment, champion)
    retrain = loop_advance(deployment_id=deployment.pk)
    assert retrain.state == Retrain.State.FAILED and retrain.job is None
    assert "models:write" in LoopEvent.objects.get(kind=LoopEvent.Kind.RETRAIN_SKIPPED).message
    assert loop_actor(deployment).api_key == key
    api_key_revoke(api_key=key, actor=Actor(user=person))
    assert actor_scopes(organization=org, actor=loop_actor(deployment)) == frozenset()
    key.delete()
    assert loop_actor(deployment) == Actor()  # gone: nothing, never the person's role


def test_the_loop_tick_is_a_registered_task_on_the_beat(settings):
    from factory_saas.celery import app

    app.loader.import_default_modules()
    assert "serving.loop_tick" in app.tasks
    entry = settings.CELERY_BEAT_SCHEDULE["serving-loop-tick"]
    assert entry == {"task": "serving.loop_tick", "schedule": settings.SERVING_LOOP_TICK_S}
