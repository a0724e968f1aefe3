"""Reads of the registry: lookups by name within an organization, comparisons and lineage."""

from __future__ import annotations

from django.conf import settings
from django.db import connection
from django.db.models import (
    Case,
    CharField,
    Count,
    Max,
    OuterRef,
    PositiveIntegerField,
    Q,
    QuerySet,
    Subquery,
    When,
)
from django.http import Http404
from django.utils import timezone

from tenants.compiled import CompiledRows, row_fields, row_instance
from tenants.errors import ConflictError
from tenants.models import Organization

from .errors import DatasetVersionNotReady, UploadNotInParts
from .models import (
    CodePackage,
    CodePackageVersion,
    Dataset,
    DatasetVersion,
    EdgeBundle,
    ModelAlias,
    ModelVersion,
    PendingUpload,
    RegisteredModel,
    StorageAccount,
)
from .storage import get_storage
from .storage.base import StoredPart, UploadNotFound

LINEAGE_DEPTH = 6


def dataset_list(*, organization: Organization) -> QuerySet[Dataset]:
    return Dataset.objects.for_organization(organization).annotate(version_count=Count("versions"))


def dataset_get(*, organization: Organization, name: str) -> Dataset:
    dataset = Dataset.objects.for_organization(organization).filter(name=name).first()
    if dataset is None:
        raise Http404
    return dataset


def dataset_version_get(
    *, organization: Organization, dataset_name: str, number: int, as_input: bool = False
) -> DatasetVersion:
    """A version by its dataset's name and number; `as_input`, without its schema, profile and
    preview (kilobytes of JSON each on real data), which naming it as a job's input never reads:
    reading one of them later costs a query."""
    if as_input:  # every job submit: a statement compiled once per process
        low, high = connection.ops.integer_field_range(
            DatasetVersion._meta.get_field("number").get_internal_type()
        )
        if not low <= number <= high:  # no version has it (the ORM's answer, not an overflow)
            raise Http404
        rows = _INPUT_VERSION.rows(
            organization=organization.pk, dataset=dataset_name, number=number
        )
        if not rows:
            raise Http404
        version = row_instance(DatasetVersion, rows[0])
        version.dataset = row_instance(Dataset, rows[0], prefix="dataset__")
        return version
    versions = DatasetVersion.objects.for_organization(organization).select_related("dataset")
    version = versions.filter(dataset__name=dataset_name, number=number).first()
    if version is None:
        raise Http404
    return version


def _input_version(*, organization: int, dataset: str, number: int):
    """dataset_version_get(as_input=True)'s row: the version without its schema, profile and
    preview, and its dataset (a dataset's version numbers are unique)."""
    return (
        DatasetVersion.objects.for_organization(Organization(pk=organization))
        .filter(dataset__name=dataset, number=number)
        .order_by()
        .values(
            *row_fields(DatasetVersion, leave_out=("schema", "profile", "preview")),
            *row_fields(Dataset, prefix="dataset__"),
        )
    )


_INPUT_VERSION = CompiledRows(_input_version, organization=int, dataset=str, number=int)


def dataset_version_require_ready(version: DatasetVersion, *, field: str = "dataset") -> None:
    """Refuse to use a version its check has not passed: every job, evaluation, deployment
    and lineage that picks a dataset version asks this first."""
    if version.state == DatasetVersion.State.READY:
        return
    if version.state == DatasetVersion.State.CHECKING:
        message = (
            f"Dataset {version} is still being checked ({version.check_progress:.0%} read); "
            "use it once it is ready."
        )
    else:
        message = (
            f"Dataset {version} was rejected by its check and cannot be used: "
            f"{version.rejection_reason} Upload a corrected file as a new version."
        )
    raise DatasetVersionNotReady(message, fields={field: [message]})


def pending_upload_accepts(*, organization_id: int, storage_key: str) -> bool:
    """Whether bytes may still arrive at `storage_key`: an upload under it is pending, unexpired.

    A finalized or discarded upload has no row, so its URL stops being honoured at once.
    """
    return PendingUpload.objects.filter(
        organization_id=organization_id, storage_key=storage_key, expires_at__gt=timezone.now()
    ).exists()


def pending_upload_require_parts(upload: PendingUpload) -> None:
    """Refuse a parts call on an upload started for one POST."""
    if not (upload.in_parts and upload.multipart_upload_id):
        raise UploadNotInParts(
            "This upload takes its file in one POST; it has no parts. Start an upload with "
            "`parts: true` to send one in parts."
        )


def pending_upload_parts(*, upload: PendingUpload) -> dict:
    """What storage holds of an upload in parts (`parts`, as storage reports them) and the
    numbers still to send (`missing`: absent, or not their reserved size)."""
    pending_upload_require_parts(upload)
    try:
        stored = get_storage().multipart_parts(
            upload.storage_key, upload_id=upload.multipart_upload_id
        )
    except UploadNotFound as exc:
        raise ConflictError(
            "This upload takes no more parts (a finalize completed it): finalize it again."
        ) from exc
    numbers = range(1, upload.part_count + 1)
    held: list[StoredPart] = [part for part in stored if part.number in numbers]
    whole = {part.number for part in held if part.size == upload.part_size(part.number)}
    return {
        "part_size_bytes": upload.part_size_bytes,
        "part_count": upload.part_count,
        "parts": held,
        "missing": [number for number in numbers if number not in whole],
    }


def pending_uploads_open(*, organization: Organization) -> QuerySet[PendingUpload]:
    """Uploads started and neither finalized nor expired: each holds its declared size of the
    organization's quota and one of its open-upload places."""
    return PendingUpload.objects.for_organization(organization).filter(
        expires_at__gt=timezone.now()
    )


def code_package_list(*, organization: Organization) -> QuerySet[CodePackage]:
    return CodePackage.objects.for_organization(organization).annotate(
        version_count=Count("versions"), latest_version=Max("versions__number")
    )


def code_package_get(*, organization: Organization, name: str) -> CodePackage:
    package = CodePackage.objects.for_organization(organization).filter(name=name).first()
    if package is None:
        raise Http404
    return package


def code_package_version_get(
    *, organization: Organization, package_name: str, number: int
) -> CodePackageVersion:
    version = (
        CodePackageVersion.objects.for_organization(organization)
        .select_related("package", "created_by")
        .filter(package__name=package_name, number=number)
        .first()
    )
    if version is None:
        raise Http404
    return version


# An own-code model's recipe: the package that made it ("code:<name>"; its recipe version "v<n>").
CODE_RECIPE_PREFIX = "code:"


def model_version_code_package(model_version: ModelVersion) -> CodePackageVersion | None:
    """The code package version whose train entry made `model_version`, of the version's own
    organization; None for a recipe's model."""
    recipe, number = model_version.recipe_name, model_version.recipe_version
    if not recipe.startswith(CODE_RECIPE_PREFIX) or not number[1:].isdigit():
        return None
    return (
        CodePackageVersion.objects.for_organization(model_version.organization_id)
        .select_related("package")
        .filter(package__name=recipe.removeprefix(CODE_RECIPE_PREFIX), number=int(number[1:]))
        .first()
    )


# Each kind of version a job names: its model, and the relation to the parent whose name it
# shows with its number.
VERSION_KINDS = {
    "dataset": (DatasetVersion, "dataset"),
    "model": (ModelVersion, "registered_model"),
    "code_package": (CodePackageVersion, "package"),
}


def version_names(
    *,
    organization: Organization,
    dataset_versions: set[int],
    model_versions: set[int],
    code_package_versions: set[int],
) -> dict[str, dict[int, tuple[str, int]]]:
    """(name, number) of each version by id, per kind ("dataset", "model", "code_package"):
    what a page of jobs shows of the versions it names, in one small query per kind named.

    Apart from the page's own query: joining the eight version and parent tables into it made
    PostgreSQL's planner spend 10 to 28 ms on every page (bench/load.py, docs/benchmarks.md).
    """
    ids_of = {
        "dataset": dataset_versions,
        "model": model_versions,
        "code_package": code_package_versions,
    }
    names: dict[str, dict[int, tuple[str, int]]] = {}
    for kind, (model, parent) in VERSION_KINDS.items():
        ids = ids_of[kind]
        rows = (
            model.objects.for_organization(organization)
            .filter(pk__in=ids)
            .order_by()  # a lookup by id: the models' orders would only add sorting
            .values_list("pk", f"{parent}__name", "number")
            if ids
            else []
        )
        names[kind] = {pk: (name, number) for pk, name, number in rows}
    return names


VERSION_NAME, VERSION_NUMBER = "{}__version_name", "{}__version_number"


def version_name_subqueries(*, kind: str, ref: str) -> dict[str, Subquery]:
    """What version_names answers for one row, as two subqueries of the row's own query: the
    name and number of the `kind` version whose id the row's `ref` column holds, under the keys
    VERSION_NAME and VERSION_NUMBER formatted with `ref` (both null where it holds none)."""
    model, parent = VERSION_KINDS[kind]
    parent_name = f"{parent}__name"
    version = model.objects.filter(
        organization=OuterRef("organization"), pk=OuterRef(ref)
    ).order_by()
    # Only where the row names a version: PostgreSQL runs a subquery per row it is asked for,
    # and most jobs name one or two of the five kinds.
    named = Q(**{f"{ref}__isnull": False})
    return {
        VERSION_NAME.format(ref): Case(
            When(named, then=Subquery(version.values(parent_name)[:1])), output_field=CharField()
        ),
        VERSION_NUMBER.format(ref): Case(
            When(named, then=Subquery(version.values("number")[:1])),
            output_field=PositiveIntegerField(),
        ),
    }


def registered_model_list(*, organization: Organization) -> QuerySet[RegisteredModel]:
    return RegisteredModel.objects.for_organization(organization).annotate(
        version_count=Count("versions")
    )


def _model_named(*, organization: int, name: str):
    return (
        RegisteredModel.objects.for_organization(Organization(pk=organization))
        .filter(name=name)
        .order_by()
        .values("pk")[:1]
    )


_MODEL_NAMED = CompiledRows(_model_named, organization=int, name=str)


def registered_model_exists(*, organization: Organization, name: str) -> bool:
    """Whether the organization has a model of that name (a job submit asks on every training
    job: its statement is compiled once per process, tenants.compiled)."""
    return bool(_MODEL_NAMED.rows(organization=organization.pk, name=name))


def registered_model_get(*, organization: Organization, name: str) -> RegisteredModel:
    model = RegisteredModel.objects.for_organization(organization).filter(name=name).first()
    if model is None:
        raise Http404
    return model


def model_version_get(
    *, organization: Organization, model_name: str, ref: str | int
) -> ModelVersion:
    """A version by number or by alias name (`3`, `production`)."""
    versions = ModelVersion.objects.for_organization(organization).select_related(
        "registered_model"
    )
    if isinstance(ref, int) or str(ref).isdigit():
        version = versions.filter(registered_model__name=model_name, number=int(ref)).first()
    else:
        alias = (
            ModelAlias.objects.for_organization(organization)
            .filter(registered_model__name=model_name, name=ref)
            .select_related("version__registered_model")
            .first()
        )
        version = alias.version if alias else None
    if version is None:
        raise Http404
    return version


def edge_bundle_get(*, model_version: ModelVersion) -> EdgeBundle | None:
    """The version's edge bundle, None until an export job made it."""
    return (
        EdgeBundle.objects.for_organization(model_version.organization)
        .filter(model_version=model_version)
        .first()
    )


def model_versions_compare(*, registered_model: RegisteredModel, numbers: list[int]) -> dict:
    """Parameters and metrics of several versions side by side, keys aligned across versions."""
    versions = list(
        ModelVersion.objects.for_organization(registered_model.organization)
        .filter(registered_model=registered_model, number__in=numbers)
        .order_by("number")
    )
    parameter_names = sorted({k for v in versions for k in v.parameters})
    metric_names = sorted({k for v in versions for k in v.metrics})
    return {
        "versions": [v.number for v in versions],
        "parameters": {k: [v.parameters.get(k) for v in versions] for k in parameter_names},
        "metrics": {k: [v.metrics.get(k) for v in versions] for k in metric_names},
    }


def storage_usage(*, organization: Organization) -> dict:
    account = StorageAccount.objects.for_organization(organization).first()
    if account is None:
        return {"used_bytes": 0, "quota_bytes": settings.STORAGE_QUOTA_DEFAULT_BYTES}
    return {"used_bytes": account.used_bytes, "quota_bytes": account.quota_bytes}


# Lineage: a small graph of nodes ("dataset_version", "model_version", "job") and edges, walked
# up (where it came from) and down (what used it) from one version, bounded in depth.


def _node(obj) -> dict:
    if isinstance(obj, CodePackageVersion):
        return {
            "type": "code_package_version",
            "id": f"code_package_version:{obj.pk}",
            "package": obj.package.name,
            "number": obj.number,
            "label": f"code package {obj.package.name} v{obj.number}",
        }
    if isinstance(obj, DatasetVersion):
        return {
            "type": "dataset_version",
            "id": f"dataset_version:{obj.pk}",
            "dataset": obj.dataset.name,
            "number": obj.number,
            "label": str(obj),
        }
    return {
        "type": "model_version",
        "id": f"model_version:{obj.pk}",
        "model": obj.registered_model.name,
        "number": obj.number,
        "label": str(obj),
    }


def _job_node(job_id: int) -> dict:
    return {"type": "job", "id": f"job:{job_id}", "job_id": job_id, "label": f"job #{job_id}"}


class _Graph:
    def __init__(self):
        self.nodes: dict[str, dict] = {}
        self.edges: list[dict] = []

    def add(self, node: dict) -> str:
        self.nodes.setdefault(node["id"], node)
        return node["id"]

    def link(self, source, target, *, job_id: int | None, relation: str) -> None:
        """source -> (job) -> target, with the job as its own node when there is one."""
        a, b = self.add(_node(source)), self.add(_node(target))
        if job_id is not None:
            j = self.add(_job_node(job_id))
            edges = [(a, j, relation), (j, b, "produced")]
        else:
            edges = [(a, b, relation)]
        for s, t, r in edges:
            edge = {"from": s, "to": t, "relation": r}
            if edge not in self.edges:
                self.edges.append(edge)


def _parents(obj) -> list[tuple[object, int | None, str]]:
    """(parent, job id, relation) for each direct input of a version: the datasets and models
    it was made from, and for a model made by own code, the code package version that ran."""
    if isinstance(obj, CodePackageVersion):
        return []
    if isinstance(obj, DatasetVersion):
        parents = []
        if obj.derived_from_dataset_version_id:
            parents.append((obj.derived_from_dataset_version, obj.source_job_id, "predicted from"))
        if obj.derived_from_model_version_id:
            parents.append((obj.derived_from_model_version, obj.source_job_id, "predicted by"))
        return parents
    parents = [
        (dv, obj.source_job_id, "trained") for dv in obj.trained_on.select_related("dataset")
    ]
    if obj.parent_version_id:
        parents.append((obj.parent_version, obj.source_job_id, "fine-tuned"))
    package = model_version_code_package(obj)
    if package is not None:
        parents.append((package, obj.source_job_id, "ran"))
    return parents


def _children(obj) -> list[tuple[object, int | None, str]]:
    if isinstance(obj, DatasetVersion):
        children = [
            (mv, mv.source_job_id, "trained")
            for mv in obj.trained_models.select_related("registered_model")
        ]
        children += [
            (dv, dv.source_job_id, "predicted from") for dv in obj.derived.select_related("dataset")
        ]
        return children
    children = [
        (dv, dv.source_job_id, "predicted by") for dv in obj.predictions.select_related("dataset")
    ]
    children += [
        (mv, mv.source_job_id, "fine-tuned")
        for mv in obj.fine_tuned.select_related("registered_model")
    ]
    return children


def _walk(graph: _Graph, start, neighbours, *, upstream: bool) -> None:
    frontier, seen = [start], {_node(start)["id"]}
    for _ in range(LINEAGE_DEPTH):
        following = []
        for obj in frontier:
            for other, job_id, relation in neighbours(obj):
                source, target = (other, obj) if upstream else (obj, other)
                graph.link(source, target, job_id=job_id, relation=relation)
                if _node(other)["id"] not in seen:
                    seen.add(_node(other)["id"])
                    following.append(other)
        frontier = following


def lineage(*, version: DatasetVersion | ModelVersion) -> dict:
    graph = _Graph()
    root = graph.add(_node(version))
    if version.source_job_id and not _parents(version):
        # Made by a job from nothing we track (a job's own output): still say which job.
        job = graph.add(_job_node(version.source_job_id))
        graph.edges.append({"from": job, "to": root, "relation": "produced"})
    _walk(graph, version, _parents, upstream=True)
    _walk(graph, version, _children, upstream=False)
    return {"root": root, "nodes": list(graph.nodes.values()), "edges": graph.edges}
