"""The factory loop's rows: deployments and their routes, the replicas serving them (each one a
`serve` job on the pool), the prediction log with its feedback labels, drift reports, the retrain
policy, and the loop's timeline.

Nothing below this app imports it: serving calls jobs (to place and stop replicas), registry (model
versions, datasets) and billing (metering); they never call back.
"""

import uuid

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from tenants.models import OrganizationOwned, OrganizationQuerySet


class LiveDeploymentManager(models.Manager.from_queryset(OrganizationQuerySet)):
    """Deployments not deleted. A deleted one is gone for every reader (the API, the pages, the
    request path, the loop, the reconciler) from the commit that deleted it, while its prediction
    log is purged in the background (serving.services.deployments_purge)."""

    def get_queryset(self):
        return super().get_queryset().filter(deleted_at__isnull=True)


class Deployment(OrganizationOwned):
    """A named endpoint of one organization that answers with the recipe's predict contract."""

    name = models.SlugField(max_length=63)
    # Every routed model version was trained by this recipe: one input and output contract.
    recipe = models.CharField(max_length=100)
    resource_class = models.ForeignKey(
        "jobs.ResourceClass", on_delete=models.PROTECT, related_name="+"
    )
    min_replicas = models.PositiveIntegerField(default=0)
    max_replicas = models.PositiveIntegerField(default=1)
    # Autoscaling aims at this many requests in flight per replica.
    target_in_flight = models.PositiveIntegerField(default=4)
    # With min_replicas 0, the last replica stops after this long without a request.
    scale_to_zero_after_s = models.PositiveIntegerField(default=900)
    # The share of predictions written to the prediction log, and how long they stay there.
    log_sample_rate = models.FloatField(
        default=1.0, validators=[MinValueValidator(0.0), MaxValueValidator(1.0)]
    )
    log_retention_days = models.PositiveIntegerField(default=30)
    # Drift: a column drifts at a distance >= column threshold; the window when that share of
    # columns (or more) drifted. Checked every `drift_window_rows` logged inputs.
    drift_column_threshold = models.FloatField(default=0.1)
    drift_share_threshold = models.FloatField(default=0.5)
    drift_window_rows = models.PositiveIntegerField(default=1000)
    last_request_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    # Set when deleted: the row (and the prediction log pointing at it) stays until purged.
    deleted_at = models.DateTimeField(null=True, blank=True)

    objects = LiveDeploymentManager()
    # Deleted ones too: for the purge only.
    all_objects = OrganizationQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            # A deleted deployment's name is free for a new one while the old one is purged.
            models.UniqueConstraint(
                fields=["organization", "name"],
                condition=models.Q(deleted_at__isnull=True),
                name="deployment_unique_name",
            ),
            models.CheckConstraint(
                condition=models.Q(min_replicas__lte=models.F("max_replicas")),
                name="deployment_min_within_max",
            ),
            models.CheckConstraint(
                condition=models.Q(log_sample_rate__gte=0) & models.Q(log_sample_rate__lte=1),
                name="deployment_sample_rate_share",
            ),
        ]

    def __str__(self):
        return self.name


class Route(OrganizationOwned):
    """A model version a deployment sends traffic to: live routes share the answers by weight
    (summing to 100); shadow routes get a copy of a `weight` percent of requests, never answer."""

    class Mode(models.TextChoices):
        LIVE = "live", "Live"
        SHADOW = "shadow", "Shadow"

    class Stage(models.TextChoices):
        STABLE = "stable", "Stable"
        CANARY = "canary", "Canary"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="routes")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    weight = models.PositiveSmallIntegerField(validators=[MaxValueValidator(100)])
    mode = models.CharField(max_length=10, choices=Mode.choices, default=Mode.LIVE)
    stage = models.CharField(max_length=10, choices=Stage.choices, default=Stage.STABLE)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["deployment", "-weight", "pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment", "model_version"], name="route_one_per_version"
            ),
            models.CheckConstraint(condition=models.Q(weight__lte=100), name="route_weight_pct"),
        ]

    def __str__(self):
        return f"{self.deployment} -> {self.model_version} ({self.mode} {self.weight}%)"


class Replica(OrganizationOwned):
    """One serving process of a deployment's model version: a `serve` job the scheduler placed.
    Its address and readiness are the job's (jobs owns the process); `draining` is this app's
    decision to stop it once its in-flight requests are answered."""

    class State(models.TextChoices):
        STARTING = "starting", "Starting"
        READY = "ready", "Ready"
        DRAINING = "draining", "Draining"
        STOPPED = "stopped", "Stopped"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="replicas")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    job = models.OneToOneField("jobs.Job", on_delete=models.PROTECT, related_name="replica")
    state = models.CharField(max_length=10, choices=State.choices, default=State.STARTING)
    created_at = models.DateTimeField(default=timezone.now)
    ready_at = models.DateTimeField(null=True, blank=True)
    drain_started_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["deployment", "pk"]
        indexes = [models.Index(fields=["deployment", "state"], name="replica_deployment_state")]

    def __str__(self):
        return f"replica {self.pk} of {self.deployment} ({self.state})"


class PredictionLog(OrganizationOwned):
    """One logged prediction, with the ground truth once feedback brings it.

    PostgreSQL, one narrow row per prediction: inputs and output as JSON, indexed by deployment,
    version and time, which is how drift windows, live metrics and retention read it; feedback
    finds a row by its public id. See docs/architecture.md for why here and not in object storage.
    """

    prediction_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="predictions")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    mode = models.CharField(max_length=10, choices=Route.Mode.choices, default=Route.Mode.LIVE)
    inputs = models.JSONField()
    output = models.JSONField(null=True, blank=True)
    # The answer failed (the replica errored): counted in the error rate, no output.
    error = models.CharField(max_length=200, blank=True)
    latency_ms = models.FloatField()
    created_at = models.DateTimeField(default=timezone.now)
    label = models.JSONField(null=True, blank=True)
    labelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [
            models.Index(fields=["deployment", "model_version", "-created_at"], name="predlog_dv"),
        ]

    def __str__(self):
        return str(self.prediction_id)


class PredictionCharge(OrganizationOwned):
    """One answered request's predictions, still to be priced: written in the same transaction as
    the request's log rows (one narrow insert on the request path), rolled up into the ledger by
    `serving.predictions_bill` every SERVING_BILL_EVERY_S, one ledger row per deployment, version,
    caller and month. The ledger's own write (price, month tally, Stripe outbox: seven statements)
    stays off the request path, and Stripe gets one meter event per roll-up, not per request.

    `request_key` and `repeat` carry the Idempotency-Key: a client's retry within
    IDEMPOTENCY_WINDOW_S finds its first request's charge and is not charged again. Billed charges
    are kept that long for it, then deleted with the prediction log's retention pass.
    """

    deployment = models.ForeignKey(
        Deployment, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    # The deployment's id as the ledger names it, kept after the deployment is deleted.
    source_id = models.CharField(max_length=64)
    model_version = models.ForeignKey(
        "registry.ModelVersion", null=True, on_delete=models.SET_NULL, related_name="+"
    )
    model_name = models.CharField(max_length=200, blank=True)
    count = models.PositiveIntegerField()
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    request_key = models.CharField(max_length=64, blank=True)
    repeat = models.PositiveIntegerField(default=1)
    created_at = models.DateTimeField(default=timezone.now)
    usage = models.ForeignKey(
        "billing.UsageRecord", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        ordering = ["pk"]
        indexes = [
            models.Index(
                fields=["id"], condition=models.Q(usage__isnull=True), name="predcharge_pending"
            ),
            models.Index(
                fields=["organization", "request_key", "-created_at"],
                condition=~models.Q(request_key=""),
                name="predcharge_request",
            ),
            models.Index(fields=["created_at"], name="predcharge_created"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "request_key", "repeat"],
                condition=~models.Q(request_key=""),
                name="predcharge_one_per_request",
            ),
        ]

    def __str__(self):
        return f"{self.count} prediction(s) of deployment {self.source_id}"


class DriftReport(OrganizationOwned):
    """One window of live inputs (and outputs) compared with the served version's training data."""

    deployment = models.ForeignKey(
        Deployment, on_delete=models.CASCADE, related_name="drift_reports"
    )
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    rows = models.PositiveIntegerField()
    drifted = models.BooleanField()
    drifted_share = models.FloatField()
    # {column: {"kind": "numeric"|"categorical", "method": ..., "distance": x, "drifted": b}}
    columns = models.JSONField(default=dict)
    prediction_drift = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-window_end", "-pk"]
        indexes = [models.Index(fields=["deployment", "-window_end"], name="drift_deployment_time")]

    def __str__(self):
        return f"drift of {self.deployment} to {self.window_end:%Y-%m-%d %H:%M}"


class RetrainPolicy(OrganizationOwned):
    """When a deployment retrains itself, on what data, and how far a challenger may go alone."""

    deployment = models.OneToOneField(
        Deployment, on_delete=models.CASCADE, related_name="retrain_policy"
    )
    # Whom the loop acts as (serving.timeline.loop_actor): whoever last saved the policy, through
    # the API key they used if they used one, so the loop never holds more than they did.
    set_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    set_by_key = models.ForeignKey(
        "tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Saved through a key: with the key gone the loop holds nothing, never its creator's role.
    set_with_key = models.BooleanField(default=False)
    enabled = models.BooleanField(default=True)
    # Triggers.
    on_drift = models.BooleanField(default=True)
    metric_below = models.FloatField(null=True, blank=True)
    on_new_data = models.BooleanField(default=False)
    every_s = models.PositiveIntegerField(null=True, blank=True)
    cooldown_s = models.PositiveIntegerField(default=3600)
    max_cost_minor = models.BigIntegerField(default=1000, help_text="Per retrain, in cents.")
    # Data: the newest version of this dataset, optionally with labelled feedback appended.
    dataset = models.ForeignKey(
        "registry.Dataset", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    append_feedback = models.BooleanField(default=False)
    # Gate.
    gate_margin = models.FloatField(default=0.0)
    slice_column = models.CharField(max_length=100, blank=True)
    slice_tolerance = models.FloatField(default=0.05)
    auto_promote = models.BooleanField(default=True)
    # Canary and rollback.
    canary_percent = models.PositiveSmallIntegerField(default=10)
    bake_s = models.PositiveIntegerField(default=600)
    # A canary with too few requests to judge bakes this many more periods, then pauses as
    # inconclusive for a person to promote or roll back (Argo Rollouts' inconclusive analysis).
    bake_extensions = models.PositiveSmallIntegerField(default=3)
    rollback_error_rate = models.FloatField(default=0.02)
    rollback_p99_ratio = models.FloatField(default=1.5)
    rollback_metric_drop = models.FloatField(default=0.02)
    last_triggered_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"retrain policy of {self.deployment}"


class LoopEvent(OrganizationOwned):
    """A row of a deployment's timeline: a step of the loop, with what it cost."""

    class Kind(models.TextChoices):
        DEPLOYED = "deployed", "Routes changed"
        REPLICA_STARTED = "replica_started", "Replica started"
        REPLICA_STOPPED = "replica_stopped", "Replica stopped"
        DRIFT_DETECTED = "drift_detected", "Drift detected"
        RETRAIN_SUBMITTED = "retrain_submitted", "Retrain submitted"
        RETRAIN_SKIPPED = "retrain_skipped", "Retrain skipped"
        RETRAIN_FAILED = "retrain_failed", "Retrain failed"
        GATE_PASSED = "gate_passed", "Gate passed"
        GATE_FAILED = "gate_failed", "Gate failed"
        APPROVED = "approved", "Approved"
        CANARY_STARTED = "canary_started", "Canary started"
        CANARY_STEPPED = "canary_stepped", "Canary stepped up"
        CANARY_INCONCLUSIVE = "canary_inconclusive", "Canary inconclusive"
        PROMOTED = "promoted", "Promoted"
        ROLLED_BACK = "rolled_back", "Rolled back"

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="timeline")
    kind = models.CharField(max_length=30, choices=Kind.choices)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    job = models.ForeignKey(
        "jobs.Job", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    model_version = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    cost_minor = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [models.Index(fields=["deployment", "-created_at"], name="loopevent_dep_time")]

    def __str__(self):
        return f"{self.deployment}: {self.kind}"


class Retrain(OrganizationOwned):
    """One turn of the loop for a deployment: the retrain job a policy submitted, the challenger it
    made, its evaluation against the champion, and the canary that follows a passing gate.

    At most one is active per deployment (a database constraint), so two ticks racing cannot
    start two retrains, and a canary never overlaps the next retrain."""

    class State(models.TextChoices):
        # Building the training data (the newest version with labelled feedback appended).
        PREPARING = "preparing", "Preparing data"
        TRAINING = "training", "Training"
        EVALUATING = "evaluating", "Evaluating"
        AWAITING_APPROVAL = "awaiting_approval", "Awaiting approval"
        CANARY = "canary", "Canary"
        # The canary keeps its share, too quiet to judge; a person promotes or rolls it back.
        INCONCLUSIVE = "inconclusive", "Canary inconclusive"
        PROMOTED = "promoted", "Promoted"
        ROLLED_BACK = "rolled_back", "Rolled back"
        REJECTED = "rejected", "Rejected by the gate"
        FAILED = "failed", "Failed"

    ACTIVE_STATES = (
        State.PREPARING,
        State.TRAINING,
        State.EVALUATING,
        State.AWAITING_APPROVAL,
        State.CANARY,
        State.INCONCLUSIVE,
    )
    # Where a person with `models:promote` decides: a challenger that passed the gate awaits
    # approval for its canary, or a canary too quiet to judge awaits promotion or rollback.
    AWAITING_DECISION_STATES = (State.AWAITING_APPROVAL, State.INCONCLUSIVE)

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="retrains")
    state = models.CharField(max_length=20, choices=State.choices, default=State.TRAINING)
    # Why it started: {"trigger": "drift"|"metric"|"new_data"|"schedule", ...the evidence}.
    trigger = models.JSONField(default=dict)
    # The training job; none yet while the data is being prepared.
    job = models.ForeignKey(
        "jobs.Job", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    champion = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    challenger = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    evaluation_job = models.ForeignKey(
        "jobs.Job", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # The canary's current share of live traffic, and when that share began to bake (while
    # preparing: when a tick claimed the data's preparation).
    canary_percent = models.PositiveSmallIntegerField(default=0)
    step_started_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["deployment"],
                condition=models.Q(
                    state__in=[
                        "preparing",
                        "training",
                        "evaluating",
                        "awaiting_approval",
                        "canary",
                        "inconclusive",
                    ]
                ),
                name="retrain_one_active_per_deployment",
            ),
            models.CheckConstraint(
                condition=models.Q(canary_percent__lte=100), name="retrain_canary_pct"
            ),
        ]
        indexes = [models.Index(fields=["deployment", "state"], name="retrain_deployment_state")]

    def __str__(self):
        return f"retrain {self.pk} of {self.deployment} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES


class ModelCard(OrganizationOwned):
    """What a challenger is and why it was (or was not) let in: its data lineage, its metrics and
    the champion's on the same held-out rows, overall and per slice, the gate's decision with its
    reasons, and who or what approved it. Written by the gate; never edited after approval."""

    class Decision(models.TextChoices):
        PASSED = "passed", "Passed"
        FAILED = "failed", "Failed"

    model_version = models.OneToOneField(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="model_card"
    )
    retrain = models.OneToOneField(Retrain, on_delete=models.CASCADE, related_name="model_card")
    champion = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.PROTECT, related_name="+"
    )
    # {"datasets": [{"dataset", "version", "id"}], "parent_version": id|None, "training_job": id,
    #  "evaluated_on": {"dataset", "version", "split": "validation"}}
    lineage = models.JSONField(default=dict)
    # {"metric": "accuracy", "higher_is_better": true, "slice_column": "...",
    #  "challenger": {"overall": x, "slices": {value: x}}, "champion": {...}}
    metrics = models.JSONField(default=dict)
    decision = models.CharField(max_length=10, choices=Decision.choices)
    reasons = models.JSONField(default=list)
    # "policy" (auto_promote), "user", or "" while a person's approval is awaited.
    approved_via = models.CharField(max_length=10, blank=True)
    approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    approved_by_label = models.CharField(max_length=255, blank=True)
    approved_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self):
        return f"model card of {self.model_version} ({self.decision})"
