"""The pool (resource classes, workers, quotas) and the work on it (jobs and their attempts)."""

from django.conf import settings
from django.db import models
from django.utils import timezone

from jobs.scheduler.policy import reserved_reason
from tenants.errors import ConflictError
from tenants.models import OrganizationOwned


class InvalidTransition(ConflictError):
    code = "invalid_transition"


class ResourceClass(models.Model):
    """A kind of accelerator (or `cpu`); its price per GPU-second lives in billing's price list."""

    name = models.SlugField(max_length=40, unique=True)
    display_name = models.CharField(max_length=100, blank=True)
    gpu_memory_gb = models.PositiveIntegerField(default=0)
    # Substrings of torch device names that identify this class ("H100", "A100-SXM4-40GB").
    device_name_patterns = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Worker(models.Model):
    class Status(models.TextChoices):
        ONLINE = "online", "Online"
        CORDONED = "cordoned", "Cordoned"
        DRAINING = "draining", "Draining"
        OFFLINE = "offline", "Offline"

    name = models.CharField(max_length=100, unique=True)
    resource_class = models.ForeignKey(
        ResourceClass, on_delete=models.PROTECT, related_name="workers"
    )
    slots = models.PositiveIntegerField()
    queue = models.CharField(max_length=120, unique=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.ONLINE)
    hostname = models.CharField(max_length=255, blank=True)
    devices = models.JSONField(default=list, blank=True)
    software_version = models.CharField(max_length=40, blank=True)
    registered_at = models.DateTimeField(default=timezone.now)
    last_heartbeat_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return f"{self.name} ({self.slots}x {self.resource_class})"


class Runtime(models.Model):
    """A named Python environment operators install on workers (`torch-2.13-py311`); own-code
    jobs name the one they need. Rows come from workers' reports, never from a form: the name is
    what jobs and workers agree on, the packages are what the last healthy report found."""

    name = models.CharField(max_length=100, unique=True)
    python_version = models.CharField(max_length=40, blank=True)
    # {"numpy": "2.3.1", ...}: distribution name to version, as importlib.metadata lists them.
    packages = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class WorkerRuntime(models.Model):
    """One worker's report of one runtime: working (error blank) or broken, and why."""

    worker = models.ForeignKey(Worker, on_delete=models.CASCADE, related_name="runtime_reports")
    runtime = models.ForeignKey(Runtime, on_delete=models.CASCADE, related_name="worker_reports")
    interpreter = models.CharField(max_length=500)
    error = models.TextField(blank=True)
    reported_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["worker", "runtime"]
        constraints = [
            models.UniqueConstraint(fields=["worker", "runtime"], name="worker_runtime_once"),
        ]

    def __str__(self):
        return f"{self.worker.name}: {self.runtime.name}{' (broken)' if self.error else ''}"

    @property
    def is_broken(self) -> bool:
        return bool(self.error)


class Quota(OrganizationOwned):
    resource_class = models.ForeignKey(
        ResourceClass, on_delete=models.CASCADE, related_name="quotas"
    )
    guaranteed_gpus = models.PositiveIntegerField(default=0)
    limit_gpus = models.PositiveIntegerField(default=0)
    max_running_jobs = models.PositiveIntegerField(default=10)
    max_queued_jobs = models.PositiveIntegerField(default=100)

    class Meta:
        ordering = ["organization", "resource_class"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "resource_class"], name="quota_one_per_class"
            ),
            models.CheckConstraint(
                condition=models.Q(guaranteed_gpus__lte=models.F("limit_gpus")),
                name="quota_guarantee_within_limit",
            ),
        ]

    def __str__(self):
        return (
            f"{self.organization}: {self.guaranteed_gpus}/{self.limit_gpus} {self.resource_class}"
        )


class JobState(models.TextChoices):
    QUEUED = "queued", "Queued"
    SCHEDULED = "scheduled", "Scheduled"
    RUNNING = "running", "Running"
    PREEMPTED = "preempted", "Preempted (checkpointing)"
    CANCELLING = "cancelling", "Cancelling"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


# The one place allowed transitions live; Job.transition_to enforces them.
TRANSITIONS: dict[str, frozenset[str]] = {
    JobState.QUEUED: frozenset({JobState.SCHEDULED, JobState.CANCELLED, JobState.FAILED}),
    JobState.SCHEDULED: frozenset(
        {
            JobState.RUNNING,
            JobState.QUEUED,
            JobState.CANCELLED,
            JobState.CANCELLING,
            JobState.FAILED,
        }
    ),
    JobState.RUNNING: frozenset(
        {
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.PREEMPTED,
            JobState.CANCELLING,
            JobState.QUEUED,
        }
    ),
    JobState.PREEMPTED: frozenset(
        {JobState.QUEUED, JobState.CANCELLING, JobState.FAILED, JobState.SUCCEEDED}
    ),
    JobState.CANCELLING: frozenset({JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}
ACTIVE_STATES = (JobState.SCHEDULED, JobState.RUNNING, JobState.PREEMPTED, JobState.CANCELLING)
TERMINAL_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


def waiting_text(reason: str, reserved_machine, expected_start_at) -> str:
    """A stored waiting reason as a person reads it now (Job.waiting_text, and a page's rows)."""
    if reserved_machine is None or expected_start_at is None:
        return reason
    seconds = (expected_start_at - timezone.now()).total_seconds()
    return reserved_reason(reason, reserved_machine, seconds)


def queued_ahead_of(*, priority, created_at, pk) -> models.Q:
    """The queued jobs the scheduler takes before a job of that priority, submit time and id
    (within its organization and class): higher priority, then earlier, then a lower id."""
    return (
        models.Q(priority__gt=priority)
        | models.Q(priority=priority, created_at__lt=created_at)
        | models.Q(priority=priority, created_at=created_at, pk__lt=pk)
    )


class Job(OrganizationOwned):
    State = JobState

    class Kind(models.TextChoices):
        TRAIN = "train", "Train"
        INFER = "infer", "Inference"
        # A deployment's replica: loads its model version once and answers predictions over
        # HTTP until it is stopped (serving/ decides how many; jobs runs them).
        SERVE = "serve", "Serving replica"
        # Scores model versions on the same held-out data, for a retrained challenger's gate.
        EVALUATE = "evaluate", "Evaluation"
        # Exports a model version to ONNX as an edge bundle (jobs.recipes.onnx_export).
        EXPORT = "export", "Edge export"

    kind = models.CharField(max_length=10, choices=Kind.choices, default=Kind.TRAIN)
    recipe = models.CharField(max_length=100)
    recipe_version = models.CharField(max_length=40, blank=True)
    # The runtime (by name) the job's code runs in; blank for recipes, which run on any worker.
    runtime = models.CharField(max_length=100, blank=True)
    parameters = models.JSONField(default=dict, blank=True)
    input_dataset_version = models.ForeignKey(
        "registry.DatasetVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    input_model_version = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    output_model_version = models.ForeignKey(
        "registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # An own-code job: the code package version whose train entry runs in the sandbox. `recipe`
    # then names the package ("code:<name>") and `recipe_version` the version ("v3").
    code_package_version = models.ForeignKey(
        "registry.CodePackageVersion",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    output_model_name = models.CharField(max_length=100, blank=True)
    output_dataset_version = models.ForeignKey(
        "registry.DatasetVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    output_dataset_name = models.CharField(max_length=100, blank=True)
    resource_class = models.ForeignKey(ResourceClass, on_delete=models.PROTECT, related_name="jobs")
    gpu_count = models.PositiveIntegerField(default=1)
    priority = models.IntegerField(default=0)
    labels = models.JSONField(default=dict, blank=True)
    max_runtime_s = models.PositiveIntegerField(default=3600)
    state = models.CharField(max_length=20, choices=JobState.choices, default=JobState.QUEUED)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by_api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # NULL, not "", when absent: the unique constraint then ignores jobs submitted without one.
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    sweep = models.ForeignKey(
        "Sweep", null=True, blank=True, on_delete=models.SET_NULL, related_name="trials"
    )
    retry_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="retries"
    )
    created_at = models.DateTimeField(default=timezone.now)
    scheduled_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The fencing token: each placement increments it, and a worker may write only for its own.
    attempt = models.PositiveIntegerField(default=0)
    lost_attempts = models.PositiveIntegerField(default=0)
    worker = models.ForeignKey(
        Worker, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    slot_indices = models.JSONField(default=list, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Why a queued job waits, as of the last scheduling pass that changed it. A reservation is
    # stored as its machine and the moment it is expected to fit, not as "expected in ~N min"
    # (which counts down): a pass rewrites a job only when its decision changed.
    waiting_reason = models.CharField(max_length=255, blank=True)
    reserved_machine = models.PositiveIntegerField(null=True, blank=True)
    expected_start_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    # A serve job's answering address ("host:port" on its worker), set once its server is ready,
    # cleared whenever the attempt ends; the web presents a token derived from job and attempt.
    serve_address = models.CharField(max_length=255, blank=True)
    serve_ready_at = models.DateTimeField(null=True, blank=True)
    checkpoint_key = models.CharField(max_length=500, blank=True)
    checkpoint_step = models.PositiveIntegerField(null=True, blank=True)
    # Kept on the row, newest only, since a person watches where a run is, not its history; the
    # history that matters is in the metrics.
    progress = models.JSONField(
        null=True,
        blank=True,
        help_text="Where the current attempt last said it was, as it runs: "
        '{"step", "total" (null when unknown), "epoch"}; for batch inference, rows. '
        "Null until its first step.",
    )
    cost_minor = models.BigIntegerField(
        default=0, help_text="Billed for finished attempts, in cents."
    )
    # The newest sampled attempt's utilization summary (jobs.utilization.summary_merge), copied
    # from its JobAttempt in the same write: the jobs list reads it from the job's own row.
    utilization = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "idempotency_key"],
                condition=models.Q(idempotency_key__isnull=False),
                name="job_unique_idempotency_key",
            ),
            models.CheckConstraint(
                condition=models.Q(state__in=JobState.values), name="job_state_valid"
            ),
            models.CheckConstraint(condition=models.Q(gpu_count__gte=1), name="job_gpus_positive"),
            # A job is retried once, so a repeated retry cannot run (and bill) it twice.
            models.UniqueConstraint(
                fields=["organization", "retry_of"],
                condition=models.Q(retry_of__isnull=False),
                name="job_retried_once",
            ),
        ]
        indexes = [
            models.Index(fields=["organization", "state", "-created_at"], name="job_org_state"),
            models.Index(fields=["state", "resource_class"], name="job_state_class"),
            models.Index(fields=["organization", "-created_at"], name="job_org_time"),
            # Operators' recent failures, across organizations, without reading every failure.
            models.Index(fields=["state", "-finished_at"], name="job_state_finished"),
        ]

    def __str__(self):
        return f"job {self.pk} ({self.recipe}, {self.state})"

    def transition_to(self, state: str) -> None:
        if state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"A {self.state} job cannot become {state}.")
        self.state = state

    @property
    def is_active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def progress_text(self) -> str:
        """Where the current attempt is, in words ("Epoch 2, step 120 of 400 (30%)", "1,200 of
        5,000 rows predicted (24%)"); "" before its first step."""
        if not self.progress:
            return ""
        step, total = self.progress["step"], self.progress["total"]
        of = f" of {total:,}" if total else ""
        share = f" ({min(100, 100 * step // total)}%)" if total else ""
        if self.kind == self.Kind.INFER:
            return f"{step:,}{of} rows predicted{share}"
        return f"Epoch {self.progress['epoch']}, step {step:,}{of}{share}"

    def clear_waiting(self) -> None:
        self.waiting_reason, self.reserved_machine, self.expected_start_at = "", None, None

    @property
    def waiting_text(self) -> str:
        """The waiting reason as a person reads it now, a reservation's ETA worked out from its
        stored moment."""
        return waiting_text(self.waiting_reason, self.reserved_machine, self.expected_start_at)

    @property
    def queue_position(self) -> int | None:
        """1-based place among its organization's queued jobs of its class, in the order the
        scheduler takes them (priority, then submit time); None unless queued.

        Worked out when read: the scheduler's own class-wide admission order moves with every
        tick's fair shares, so storing it rewrote most queued jobs each tick. A list sets
        `queued_ahead` on its jobs (`selectors.queue_positions_attach`, a query per resource
        class of its queued jobs) instead of asking once per job.
        """
        if self.state != JobState.QUEUED:
            return None
        ahead = self.__dict__.get("queued_ahead")
        if ahead is None:
            ahead = (
                Job.objects.filter(
                    organization_id=self.organization_id,
                    resource_class_id=self.resource_class_id,
                    state=JobState.QUEUED,
                )
                .filter(
                    queued_ahead_of(priority=self.priority, created_at=self.created_at, pk=self.pk)
                )
                .count()
            )
        return ahead + 1


class JobAttempt(OrganizationOwned):
    """One placement of a job on a worker, from scheduling to its end; billed once."""

    class Outcome(models.TextChoices):
        ACTIVE = "active", "Active"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        PREEMPTED = "preempted", "Preempted"
        CANCELLED = "cancelled", "Cancelled"
        LOST = "lost", "Lost (worker stopped heartbeating)"

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    worker = models.ForeignKey(Worker, null=True, on_delete=models.SET_NULL, related_name="+")
    slot_indices = models.JSONField(default=list)
    scheduled_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=20, choices=Outcome.choices, default=Outcome.ACTIVE)
    # Running summary of its UtilizationSamples (counts, time-weighted averages, peaks), kept up
    # to date with each report so that nothing reads the samples to summarize them.
    utilization = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["job", "number"]
        constraints = [
            models.UniqueConstraint(fields=["job", "number"], name="job_attempt_unique_number"),
        ]
        # Pool utilization reads the attempts still open or ended recently, not all history.
        indexes = [models.Index(fields=["ended_at"], name="jobattempt_ended")]

    def __str__(self):
        return f"job {self.job_id} attempt {self.number} ({self.outcome})"


class JobEvent(OrganizationOwned):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events")
    attempt = models.PositiveIntegerField(default=0)
    kind = models.CharField(max_length=40)
    message = models.TextField(blank=True)
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "pk"]
        indexes = [models.Index(fields=["job", "created_at"], name="jobevent_job_time")]

    def __str__(self):
        return f"job {self.job_id}: {self.kind}"


class JobLog(OrganizationOwned):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="logs")
    attempt = models.PositiveIntegerField()
    stream = models.CharField(max_length=6, default="stdout")
    line = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["pk"]
        indexes = [models.Index(fields=["job", "id"], name="joblog_job_seq")]

    def __str__(self):
        return self.line[:80]


class JobMetric(OrganizationOwned):
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="metrics")
    attempt = models.PositiveIntegerField()
    step = models.PositiveIntegerField()
    name = models.CharField(max_length=100)
    split = models.CharField(max_length=20, blank=True)
    value = models.FloatField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["step", "pk"]
        indexes = [models.Index(fields=["job", "name", "step"], name="jobmetric_job_name_step")]

    def __str__(self):
        return f"{self.name}[{self.step}]={self.value}"


class UtilizationSample(OrganizationOwned):
    """One reading of a running attempt (jobs.utilization.Sample): its processes' CPU cores and
    resident memory and, on GPUs, their utilization and the fullest one's memory. An attempt keeps
    at most UTILIZATION_MAX_SAMPLES of them (thinned as it runs)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="utilization_samples")
    attempt = models.PositiveIntegerField()
    at = models.DateTimeField()
    seconds = models.FloatField(help_text="The span this sample stands for.")
    cpu_cores = models.FloatField()
    memory_bytes = models.BigIntegerField()
    gpu_utilization = models.FloatField(null=True, blank=True)
    gpu_memory_bytes = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["at", "pk"]
        indexes = [
            models.Index(fields=["job", "attempt", "at"], name="utilsample_job_attempt_at"),
        ]

    def __str__(self):
        return f"job {self.job_id} attempt {self.attempt} at {self.at:%H:%M:%S}"


class Sweep(OrganizationOwned):
    """A hyperparameter search: one trial job per point of a grid or random sample."""

    class Strategy(models.TextChoices):
        GRID = "grid", "Grid"
        RANDOM = "random", "Random"

    class State(models.TextChoices):
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    class Mode(models.TextChoices):
        MAX = "max", "Maximize"
        MIN = "min", "Minimize"

    name = models.CharField(max_length=100, help_text="Trials register as versions of this model.")
    recipe = models.CharField(max_length=100)
    base_parameters = models.JSONField(default=dict)
    space = models.JSONField(
        help_text='e.g. {"learning_rate": {"min": 1e-4, "max": 1e-2, "log": true}}'
    )
    strategy = models.CharField(max_length=10, choices=Strategy.choices, default=Strategy.RANDOM)
    trial_count = models.PositiveIntegerField()
    # Random search draws its points from this, so a sweep can be repeated exactly.
    seed = models.PositiveIntegerField(default=0)
    metric = models.CharField(max_length=100)
    mode = models.CharField(max_length=3, choices=Mode.choices, default=Mode.MAX)
    state = models.CharField(max_length=10, choices=State.choices, default=State.RUNNING)
    best_job = models.ForeignKey(
        Job, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [models.Index(fields=["organization", "state"], name="sweep_org_state")]

    def __str__(self):
        return f"sweep {self.pk} ({self.name})"
