"""Submitting, cancelling and retrying jobs: what a tenant asks of the pool.

Each kind of job has its own checks, which turn a request into a `JobSpec`: `training_spec` (a
recipe trains on a dataset version, perhaps continuing a model version), `code_package_spec` (a
tenant's package trains), `inference_spec` (a model version predicts over a dataset version,
by its recipe or by the predict entry of the package that made it) and `export_spec` (a model
version becomes an ONNX edge bundle); a sweep builds training specs for its trials.
Every kind then passes through `job_admit`, the one admission path: the scopes the job's outputs
need, the options, the quota under its lock, the job row with its event and audit record, and a
tick after commit. `training_job_submit` and `inference_job_submit` put an idempotency key in
front of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import Count, Max
from django.utils import timezone

from billing.selectors import gpu_resource, unit_price
from jobs.models import Job, JobAttempt, JobState, ResourceClass, Sweep, Worker
from jobs.recipes.base import Recipe, validate_parameters
from jobs.recipes.catalog import get_recipe
from jobs.recipes.onnx_export import EXPORTABLE_RECIPES
from jobs.runner.protocol import StrictValidator
from registry.models import CodePackageVersion, DatasetVersion, ModelVersion
from registry.selectors import (
    CODE_RECIPE_PREFIX,
    dataset_list,
    dataset_version_require_ready,
    edge_bundle_get,
    model_version_code_package,
    registered_model_exists,
)
from registry.services.datasets import validate_name
from tenants.actors import Actor
from tenants.compiled import CompiledRows
from tenants.errors import ConflictError, DomainError, PermissionDeniedError
from tenants.models import Organization
from tenants.selectors import actor_scopes
from tenants.services import audit_record

from .attempts import attempt_close, attempt_release, checkpoint_forget
from .events import job_ended_publish, job_event
from .quotas import quota_locked
from .ticks import tick_soon

# What a code package's batch inference reads (the worker hands its rows over as JSON objects).
PACKAGE_PREDICT_FORMATS = ("csv", "parquet")


class QuotaExceeded(ConflictError):
    code = "quota_exceeded"


MAX_RUNTIME_S = 7 * 24 * 3600
MAX_LABELS = 20
# A letter first, so a key is never read as a JSON array index (reports group by label keys).
LABEL_KEY = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class JobOptions:
    """What every kind of job asks beside its inputs: where it runs, on how many GPUs, for how
    long at most, how it ranks among its organization's jobs, and its labels."""

    resource_class: ResourceClass
    gpu_count: int = 1
    priority: int = 0
    max_runtime_s: int = 3600
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class JobSpec:
    """One job, checked by the rules of its kind and ready for admission."""

    kind: str
    recipe: type[Recipe] | None  # None for a code package's job
    parameters: dict
    dataset_version: DatasetVersion | None  # None for a serve job, which reads no dataset
    model_version: ModelVersion | None = None
    output_model_name: str = ""
    output_dataset_name: str = ""
    # The alias moved on the output model once the job's outcome is known (a sweep's `best`).
    moves_alias: str = ""
    sweep: Sweep | None = None
    retry_of: Job | None = None
    code_package_version: CodePackageVersion | None = None

    @property
    def recipe_name(self) -> str:
        """What the job row's `recipe` says: the recipe, or "code:<package>" for own code."""
        if self.code_package_version is not None:
            return f"{CODE_RECIPE_PREFIX}{self.code_package_version.package.name}"
        return self.recipe.name

    @property
    def runtime(self) -> str:
        """The runtime the job's code needs (the scheduler places it only where it is); blank
        for a recipe, which runs on any worker."""
        if self.code_package_version is not None:
            return self.code_package_version.manifest["runtime"]["name"]
        return ""

    @property
    def recipe_version(self) -> str:
        if self.code_package_version is not None:
            return f"v{self.code_package_version.number}"
        return self.recipe.version


def cost_rate_per_hour(*, resource_class: ResourceClass, gpu_count: int) -> tuple[Decimal, str]:
    price, currency = unit_price(resource=gpu_resource(resource_class.name), at=timezone.now())
    return price * gpu_count * 3600, currency


def _validate_labels(labels: dict) -> dict:
    if not isinstance(labels, dict) or len(labels) > MAX_LABELS:
        raise DomainError(
            "Labels are up to 20 key/value strings.", fields={"labels": ["Up to 20 string pairs."]}
        )
    for key, value in labels.items():
        if not (
            isinstance(key, str)
            and isinstance(value, str)
            and LABEL_KEY.fullmatch(key)
            and len(value) <= 200
        ):
            raise DomainError(
                f"Label {key!r} is not a short string pair.",
                fields={
                    "labels": [
                        "Keys: 1-63 letters, digits, '.', '_' or '-', starting with a letter; "
                        "values up to 200 characters."
                    ]
                },
            )
    return labels


def _largest_worker(*, resource_class: int):
    """The most GPUs one worker of the class has: one row, none where the class has no worker."""
    return (
        Worker.objects.filter(resource_class=resource_class)
        .order_by()
        .values("resource_class")
        .annotate(largest=Max("slots"))
    )


# Statements a submit runs, compiled once per process (tenants.compiled): building and compiling
# each was most of its CPU; the organization is a parameter of every run of a tenant's statement.
_LARGEST_WORKER = CompiledRows(_largest_worker, resource_class=int)


def _options_check(options: JobOptions, *, kind: str) -> None:
    gpu_count, resource_class = options.gpu_count, options.resource_class
    if not 1 <= gpu_count <= 64:
        raise DomainError("Ask for 1 to 64 GPUs.", fields={"gpu_count": ["Between 1 and 64."]})
    rows = _LARGEST_WORKER.rows(resource_class=resource_class.pk)
    largest = rows[0]["largest"] if rows else None
    if largest is not None and gpu_count > largest:
        raise DomainError(
            f"No {resource_class} machine has {gpu_count} GPUs (the largest has {largest}).",
            fields={"gpu_count": [f"At most {largest} on {resource_class}."]},
        )
    # A replica runs until it is stopped: 0, no maximum, and only for it.
    unbounded = kind == Job.Kind.SERVE and options.max_runtime_s == 0
    if not unbounded and not 60 <= options.max_runtime_s <= MAX_RUNTIME_S:
        raise DomainError(
            "Max runtime is 1 minute to 7 days.",
            fields={"max_runtime_s": ["60 to 604800 seconds."]},
        )
    _validate_labels(options.labels)


def _inputs_check(
    *,
    organization: Organization,
    dataset_version: DatasetVersion | None,
    model_version: ModelVersion | None,
) -> None:
    for linked in (dataset_version, model_version):
        if linked is not None and linked.organization_id != organization.pk:
            raise DomainError("Inputs must be this organization's own versions.")
    if dataset_version is None:
        raise DomainError(
            "A job needs an input dataset version.", fields={"dataset": ["Required."]}
        )
    dataset_version_require_ready(dataset_version)


def _format_check(recipe_cls: type[Recipe], dataset_version: DatasetVersion) -> None:
    if dataset_version.format not in recipe_cls.dataset_formats:
        raise DomainError(
            f"{recipe_cls.name} reads {', '.join(recipe_cls.dataset_formats)}; "
            f"this dataset version is {dataset_version.format}.",
            fields={"dataset": [f"Choose a {' or '.join(recipe_cls.dataset_formats)} dataset."]},
        )


def training_spec(
    *,
    organization: Organization,
    recipe: str,
    parameters: dict,
    dataset_version: DatasetVersion,
    gpu_count: int,
    model_version: ModelVersion | None = None,
    output_model_name: str = "",
) -> JobSpec:
    """A training job: the recipe accepts the parameters and reads the dataset's format, trains
    on `gpu_count` GPUs only if it trains data-parallel, and continues `model_version` only if
    it made it. Its model is `output_model_name`, else the continued version's model, else
    `<recipe>-<dataset>`."""
    _inputs_check(
        organization=organization, dataset_version=dataset_version, model_version=model_version
    )
    recipe_cls = get_recipe(recipe)
    parameters = validate_parameters(recipe_cls, parameters or {})
    if model_version is not None and model_version.recipe_name != recipe:
        raise DomainError(
            f"{model_version} was trained by {model_version.recipe_name or 'no recipe'}; "
            f"continue training it with that recipe, not {recipe}.",
            fields={"model": ["Must come from the same recipe."]},
        )
    _format_check(recipe_cls, dataset_version)
    if gpu_count > 1 and not recipe_cls.distributed:
        raise DomainError(
            f"{recipe} trains on one GPU; ask for 1.",
            fields={"gpu_count": ["This recipe does not train data-parallel."]},
        )
    default_model = (
        model_version.registered_model.name
        if model_version is not None
        else f"{recipe}-{dataset_version.dataset.name}"
    )
    return JobSpec(
        kind=Job.Kind.TRAIN,
        recipe=recipe_cls,
        parameters=parameters,
        dataset_version=dataset_version,
        model_version=model_version,
        output_model_name=validate_name(output_model_name or default_model, field="output_model"),
    )


def inference_spec(
    *,
    organization: Organization,
    model_version: ModelVersion | None,
    dataset_version: DatasetVersion,
    parameters: dict | None = None,
    output_dataset_name: str = "",
) -> JobSpec:
    """A batch prediction: a version the platform trained, run by its own recipe over a dataset
    in a format that recipe reads, into `output_dataset_name` (default `<model>-predictions`)."""
    _inputs_check(
        organization=organization, dataset_version=dataset_version, model_version=model_version
    )
    if model_version is None:
        raise DomainError("Batch inference needs a model version.", fields={"model": ["Required."]})
    package = predicting_package(model_version, field="model")
    if package is not None:
        return _package_inference_spec(
            package,
            model_version=model_version,
            dataset_version=dataset_version,
            parameters=parameters,
            output_dataset_name=output_dataset_name,
        )
    if not model_version.recipe_name:
        raise DomainError(
            f"{model_version} was not trained by a recipe, so no recipe can run it.",
            fields={"model": ["Choose a version trained on the platform."]},
        )
    recipe_cls = get_recipe(model_version.recipe_name)
    parameters = validate_parameters(recipe_cls, parameters or {}, task="predict")
    _format_check(recipe_cls, dataset_version)
    return JobSpec(
        kind=Job.Kind.INFER,
        recipe=recipe_cls,
        parameters=parameters,
        dataset_version=dataset_version,
        model_version=model_version,
        output_dataset_name=validate_name(
            output_dataset_name or f"{model_version.registered_model.name}-predictions",
            field="output_dataset",
        ),
    )


def predicting_package(model_version: ModelVersion, *, field: str) -> CodePackageVersion | None:
    """The code package version whose predict entry runs `model_version`: the one whose train
    entry made it. None for a recipe's model; a DomainError on `field` for an own-code model
    whose package has no predict entry (or no longer exists)."""
    if not model_version.recipe_name.startswith(CODE_RECIPE_PREFIX):
        return None
    package = model_version_code_package(model_version)
    made_by = f"{model_version.recipe_name} {model_version.recipe_version}"
    if package is None:
        raise DomainError(
            f"{model_version} was made by {made_by}, which no longer exists.",
            fields={field: ["Its code package version is gone."]},
        )
    if not package.manifest["entry"].get("predict"):
        raise DomainError(
            f"{model_version} was made by {made_by}, whose factory.toml names no predict entry, "
            'so nothing can run it. Add `predict = "module:function"` under [entry] and train '
            "with the new version.",
            fields={field: [f"{made_by} has no predict entry."]},
        )
    return package


def _package_inference_spec(
    package: CodePackageVersion,
    *,
    model_version: ModelVersion,
    dataset_version: DatasetVersion,
    parameters: dict | None,
    output_dataset_name: str,
) -> JobSpec:
    if parameters:
        raise DomainError(
            "A package's predict entry takes no parameters.",
            fields={"parameters": ["Leave empty for a code package's model."]},
        )
    if dataset_version.format not in PACKAGE_PREDICT_FORMATS:
        raise DomainError(
            f"A package's batch inference reads CSV or Parquet datasets; "
            f"{dataset_version} is {dataset_version.get_format_display()}.",
            fields={"dataset": ["Choose a CSV or Parquet version."]},
        )
    return JobSpec(
        kind=Job.Kind.INFER,
        recipe=None,
        parameters={},
        dataset_version=dataset_version,
        model_version=model_version,
        output_dataset_name=validate_name(
            output_dataset_name or f"{model_version.registered_model.name}-predictions",
            field="output_dataset",
        ),
        code_package_version=package,
    )


def export_spec(*, organization: Organization, model_version: ModelVersion | None) -> JobSpec:
    """An edge export: a version of this organization, made by a recipe that exports, and not
    exported yet (its bundle is then there to download)."""
    if model_version is None:
        raise DomainError("An edge export needs a model version.", fields={"model": ["Required."]})
    if model_version.organization_id != organization.pk:
        raise DomainError("Inputs must be this organization's own versions.")
    if model_version.recipe_name not in EXPORTABLE_RECIPES:
        raise DomainError(
            f"{model_version} was made by {model_version.recipe_name or 'no recipe'}, which has "
            f"no edge export; the recipes that do: {', '.join(sorted(EXPORTABLE_RECIPES))}.",
            fields={"model": ["Choose a version trained by a built-in recipe."]},
        )
    if edge_bundle_get(model_version=model_version) is not None:
        raise ConflictError(f"{model_version} is already exported; download its edge bundle.")
    return JobSpec(
        kind=Job.Kind.EXPORT,
        recipe=get_recipe(model_version.recipe_name),
        parameters={"source": str(model_version)},
        dataset_version=None,
        model_version=model_version,
    )


def code_package_spec(
    *,
    organization: Organization,
    code_package_version: CodePackageVersion,
    parameters: dict,
    dataset_version: DatasetVersion | None = None,
    model_version: ModelVersion | None = None,
    output_model_name: str = "",
    output_dataset_name: str = "",
) -> JobSpec:
    """A code package version's train entry, run in the sandbox: the parameters must match the
    package's JSON Schema (defaults are the package's own business), its outputs are named by
    the job (default `<package>` for a model, `<package>-output` for a dataset), never by the
    code. The dataset version and the model version (a fine-tune's starting point), when given,
    are downloaded for it as its inputs; a model it registers then records that version as its
    parent."""
    version = code_package_version
    for linked in (version, dataset_version, model_version):
        if linked is not None and linked.organization_id != organization.pk:
            raise DomainError("Inputs must be this organization's own versions.")
    if dataset_version is not None:
        dataset_version_require_ready(dataset_version)
    parameters = parameters if parameters is not None else {}
    if not isinstance(parameters, dict):
        raise DomainError(
            "Parameters are a JSON object.", fields={"parameters": ["Must be an object."]}
        )
    schema = version.manifest["parameters"]
    try:
        errors = sorted(StrictValidator(schema).iter_errors(parameters), key=lambda e: list(e.path))
    except RecursionError as exc:  # a schema whose $ref leads back to itself without end
        raise DomainError(
            f"{version}'s parameters schema refers to itself without end; fix the package.",
            fields={"parameters": ["The package's schema cannot be checked."]},
        ) from exc
    if errors:
        fields: dict[str, list[str]] = {}
        for error in errors[:20]:
            where = ".".join(["parameters", *(str(part) for part in error.absolute_path)])
            fields.setdefault(where, []).append(error.message)
        first = next(iter(fields.items()))
        raise DomainError(
            f"The parameters do not match {version}'s schema: {first[0]}: {first[1][0]}",
            fields=fields,
        )
    outputs = version.manifest["outputs"]
    package = version.package.name
    return JobSpec(
        kind=Job.Kind.TRAIN,
        recipe=None,
        parameters=parameters,
        dataset_version=dataset_version,
        model_version=model_version,
        output_model_name=(
            validate_name(output_model_name or package, field="output_model")
            if outputs["model"]
            else ""
        ),
        output_dataset_name=(
            validate_name(output_dataset_name or f"{package}-output", field="output_dataset")
            if outputs["dataset"]
            else ""
        ),
        code_package_version=version,
    )


def code_job_submit(
    *,
    organization: Organization,
    actor: Actor,
    code_package_version: CodePackageVersion,
    parameters: dict,
    options: JobOptions,
    dataset_version: DatasetVersion | None = None,
    model_version: ModelVersion | None = None,
    output_model_name: str = "",
    output_dataset_name: str = "",
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Queue a run of a code package version's train entry; returns (job, created). A repeated
    key returns the first job."""
    first = _job_with_key(organization=organization, idempotency_key=idempotency_key)
    if first is not None:
        return first, False
    spec = code_package_spec(
        organization=organization,
        code_package_version=code_package_version,
        parameters=parameters,
        dataset_version=dataset_version,
        model_version=model_version,
        output_model_name=output_model_name,
        output_dataset_name=output_dataset_name,
    )
    return job_admit(
        organization=organization,
        actor=actor,
        spec=spec,
        options=options,
        idempotency_key=idempotency_key,
    )


def _outputs_allowed(*, organization: Organization, actor: Actor, spec: JobSpec) -> None:
    """`jobs:write` runs jobs; a job that adds a version to an existing model or dataset, or
    moves an alias, needs the scope that doing so directly needs. A new output is the job's own."""
    needs: dict[str, str] = {}
    model_name, dataset_name = spec.output_model_name, spec.output_dataset_name
    if model_name and registered_model_exists(organization=organization, name=model_name):
        needs["models:write"] = f"adds a version to the existing model {model_name}"
    if dataset_name and dataset_list(organization=organization).filter(name=dataset_name).exists():
        needs["datasets:write"] = f"adds a version to the existing dataset {dataset_name}"
    if spec.kind == Job.Kind.EXPORT:
        needs["models:write"] = f"adds an edge bundle to the model version {spec.model_version}"
    if spec.moves_alias:
        needs["models:promote"] = f"moves the alias {spec.moves_alias!r} of model {model_name}"
    if not needs:
        return
    granted = actor_scopes(organization=organization, actor=actor)
    for scope, what in needs.items():
        if scope not in granted:
            raise PermissionDeniedError(f"This job {what}, which needs the {scope} scope.")


def _job_with_key(*, organization: Organization, idempotency_key: str | None) -> Job | None:
    if not idempotency_key:
        return None
    if len(idempotency_key) > 200:
        raise DomainError(
            "The Idempotency-Key is longer than 200 characters.",
            fields={"idempotency_key": ["At most 200 characters, e.g. a UUID."]},
        )
    keyed = _KEYED_JOB.rows(organization=organization.pk, key=idempotency_key)
    # A retry, the rare case: the first job, read whole.
    if not keyed:
        return None
    return Job.objects.for_organization(organization).filter(pk=keyed[0]["pk"]).first()


def _keyed_job(*, organization: int, key: str):
    """The id of the organization's job submitted with the idempotency key (one at most)."""
    return (
        Job.objects.for_organization(Organization(pk=organization))
        .filter(idempotency_key=key)
        .order_by()
        .values("pk")
    )


_KEYED_JOB = CompiledRows(_keyed_job, organization=int, key=str)


def _queued(*, organization: int, resource_class: int):
    """How many of the organization's jobs wait in the class's queue: one row, none for none."""
    return (
        Job.objects.for_organization(Organization(pk=organization))
        .filter(resource_class=resource_class, state=JobState.QUEUED)
        .order_by()
        .values("organization")
        .annotate(n=Count("pk"))
    )


_QUEUED = CompiledRows(_queued, organization=int, resource_class=int)


def job_admit(
    *,
    organization: Organization,
    actor: Actor,
    spec: JobSpec,
    options: JobOptions,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Queue a checked job; returns (job, created). A key that raced another submit returns
    the winner's job, not a second one."""
    _options_check(options, kind=spec.kind)
    _outputs_allowed(organization=organization, actor=actor, spec=spec)
    resource_class, gpu_count = options.resource_class, options.gpu_count
    try:
        with transaction.atomic():
            # Locking the quota row serialises concurrent submits of one organization and class,
            # so the queued-jobs cap holds under races.
            quota = quota_locked(organization=organization, resource_class=resource_class)
            if gpu_count > quota.limit_gpus:
                raise QuotaExceeded(
                    f"The job asks for {gpu_count} {resource_class} GPUs; "
                    f"your quota allows {quota.limit_gpus}.",
                    fields={"gpu_count": [f"At most {quota.limit_gpus}."]},
                )
            # Its own statement, after the lock: one taken with the lock would count from a
            # snapshot older than the submit it waited for.
            counted = _QUEUED.rows(organization=organization.pk, resource_class=resource_class.pk)
            queued = counted[0]["n"] if counted else 0
            if queued >= quota.max_queued_jobs:
                raise QuotaExceeded(
                    f"{queued} jobs are already queued on {resource_class}, the most your quota "
                    "allows; wait for some to start or cancel some."
                )
            job = Job.objects.create(
                organization=organization,
                kind=spec.kind,
                recipe=spec.recipe_name,
                recipe_version=spec.recipe_version,
                code_package_version=spec.code_package_version,
                runtime=spec.runtime,
                parameters=spec.parameters,
                input_dataset_version=spec.dataset_version,
                input_model_version=spec.model_version,
                output_model_name=spec.output_model_name,
                output_dataset_name=spec.output_dataset_name,
                resource_class=resource_class,
                gpu_count=gpu_count,
                priority=options.priority,
                labels=options.labels,
                max_runtime_s=options.max_runtime_s,
                created_by=actor.api_key.created_by if actor.api_key else actor.user,
                created_by_api_key=actor.api_key,
                idempotency_key=idempotency_key or None,
                sweep=spec.sweep,
                retry_of=spec.retry_of,
                waiting_reason="waiting for the scheduler",
            )
            job_event(
                job=job, kind="submitted", message=f"Queued for {gpu_count}x {resource_class}."
            )
            data = {
                "kind": spec.kind,
                "recipe": spec.recipe_name,
                "gpus": gpu_count,
                "resource_class": resource_class.name,
            }
            if spec.retry_of is not None:
                data["retry_of"] = spec.retry_of.pk
            audit_record(
                organization=organization,
                actor=actor,
                action="job.retry" if spec.retry_of is not None else "job.submit",
                target=job,
                data=data,
            )
            transaction.on_commit(tick_soon)
    except IntegrityError:
        existing = _job_with_key(organization=organization, idempotency_key=idempotency_key)
        if existing is None:
            raise
        return existing, False
    return job, True


def training_job_submit(
    *,
    organization: Organization,
    actor: Actor,
    recipe: str,
    parameters: dict,
    dataset_version: DatasetVersion,
    options: JobOptions,
    model_version: ModelVersion | None = None,
    output_model_name: str = "",
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Queue a training job; returns (job, created). A repeated key returns the first job."""
    first = _job_with_key(organization=organization, idempotency_key=idempotency_key)
    if first is not None:
        return first, False
    spec = training_spec(
        organization=organization,
        recipe=recipe,
        parameters=parameters,
        dataset_version=dataset_version,
        gpu_count=options.gpu_count,
        model_version=model_version,
        output_model_name=output_model_name,
    )
    return job_admit(
        organization=organization,
        actor=actor,
        spec=spec,
        options=options,
        idempotency_key=idempotency_key,
    )


def inference_job_submit(
    *,
    organization: Organization,
    actor: Actor,
    model_version: ModelVersion | None,
    dataset_version: DatasetVersion,
    options: JobOptions,
    parameters: dict | None = None,
    output_dataset_name: str = "",
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Queue a batch prediction; returns (job, created). A repeated key returns the first job."""
    first = _job_with_key(organization=organization, idempotency_key=idempotency_key)
    if first is not None:
        return first, False
    spec = inference_spec(
        organization=organization,
        model_version=model_version,
        dataset_version=dataset_version,
        parameters=parameters,
        output_dataset_name=output_dataset_name,
    )
    return job_admit(
        organization=organization,
        actor=actor,
        spec=spec,
        options=options,
        idempotency_key=idempotency_key,
    )


def export_job_submit(
    *,
    organization: Organization,
    actor: Actor,
    model_version: ModelVersion | None,
    options: JobOptions,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Queue an edge export of `model_version`; returns (job, created). A repeated key returns
    the first job."""
    first = _job_with_key(organization=organization, idempotency_key=idempotency_key)
    if first is not None:
        return first, False
    return job_admit(
        organization=organization,
        actor=actor,
        spec=export_spec(organization=organization, model_version=model_version),
        options=options,
        idempotency_key=idempotency_key,
    )


def job_stop_request(job: Job) -> None:
    """Cancel a job not started yet at once; ask a started one's runner to stop it (the caller
    holds the row lock and saves)."""
    if job.state in (JobState.QUEUED, JobState.SCHEDULED):
        # Not started: a scheduled run message finds the job cancelled when it claims it.
        job.transition_to(JobState.CANCELLED)
        job.finished_at = timezone.now()
        job.clear_waiting()
        attempt_close(job=job, outcome=JobAttempt.Outcome.CANCELLED)
        checkpoint_forget(job=job)
        attempt_release(job)
        job_ended_publish(job=job)
    else:
        job.transition_to(JobState.CANCELLING)


@transaction.atomic
def job_cancel(*, job: Job, actor: Actor) -> Job:
    job = Job.objects.select_for_update().get(pk=job.pk)
    if job.is_terminal or job.state == JobState.CANCELLING:
        raise ConflictError(f"The job is already {job.state}.")
    job_stop_request(job)
    job.save()
    job_event(job=job, kind="cancel_requested", message=f"Cancelled by {actor.label}.")
    audit_record(organization=job.organization, actor=actor, action="job.cancel", target=job)
    transaction.on_commit(tick_soon)
    return job


@transaction.atomic
def job_retry(*, job: Job, actor: Actor) -> Job:
    """Submit a failed or cancelled job again, as a new job that points at the old one.

    A job is retried once: a second retry (a double click, a client's retry after a timeout)
    is refused, naming the first, rather than running the job twice.
    """
    job = (
        Job.objects.for_organization(job.organization)
        .select_related("input_dataset_version__dataset", "input_model_version__registered_model")
        .select_for_update(of=("self",))
        .get(pk=job.pk)
    )
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise ConflictError(
            f"Only failed or cancelled jobs can be retried; this one is {job.state}."
        )
    if job.kind == Job.Kind.SERVE:
        raise ConflictError("A replica is not retried; its deployment starts another.")
    earlier = job.retries.order_by("pk").first()
    if earlier is not None:
        raise ConflictError(f"Job {job.pk} was already retried as job {earlier.pk}; retry that.")
    if job.code_package_version is not None:
        spec = code_package_spec(
            organization=job.organization,
            code_package_version=job.code_package_version,
            parameters=job.parameters,
            dataset_version=job.input_dataset_version,
            output_model_name=job.output_model_name,
            output_dataset_name=job.output_dataset_name,
        )
    elif job.kind == Job.Kind.EXPORT:
        spec = export_spec(organization=job.organization, model_version=job.input_model_version)
    elif job.kind == Job.Kind.INFER:
        spec = inference_spec(
            organization=job.organization,
            model_version=job.input_model_version,
            dataset_version=job.input_dataset_version,
            parameters=job.parameters,
            output_dataset_name=job.output_dataset_name,
        )
    else:
        spec = training_spec(
            organization=job.organization,
            recipe=job.recipe,
            parameters=job.parameters,
            dataset_version=job.input_dataset_version,
            gpu_count=job.gpu_count,
            model_version=job.input_model_version,
            output_model_name=job.output_model_name,
        )
    options = JobOptions(
        resource_class=job.resource_class,
        gpu_count=job.gpu_count,
        priority=job.priority,
        max_runtime_s=job.max_runtime_s,
        labels=job.labels,
    )
    retried, _ = job_admit(
        organization=job.organization,
        actor=actor,
        spec=replace(spec, retry_of=job),
        options=options,
    )
    return retried
