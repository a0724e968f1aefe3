import functools
import json

from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.http import Http404
from django.utils import timezone
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import generics, mixins, permissions, status
from rest_framework.decorators import action
from rest_framework.response import Response

from factory_saas.api_pagination import CreatedCursorPagination
from jobs import selectors, services
from jobs.models import Job, JobEvent, JobLog, JobMetric, ResourceClass, Sweep
from jobs.recipes.catalog import list_recipes
from jobs.services import sweeps
from registry.models import RegisteredModel
from registry.selectors import code_package_version_get, dataset_version_get, model_version_get
from tenants.api.base import OrganizationScopedAPIView, OrganizationScopedViewSet
from tenants.compiled import CompiledRows, CompiledSelect
from tenants.errors import DomainError
from tenants.models import Organization
from tenants.seal import organization_rows
from tenants.standing import Effect

from . import serializers as s

LOG_PAGE = 500


def _estimate(resource_class: ResourceClass, gpu_count: int, max_runtime_s: int) -> dict:
    rate, currency = services.cost_rate_per_hour(resource_class=resource_class, gpu_count=gpu_count)
    most = rate * max_runtime_s / 3600
    return {
        "estimated_cost_per_hour": {"amount": f"{rate:.4f}", "currency": currency},
        "estimated_max_cost": {"amount": f"{most:.2f}", "currency": currency},
    }


class CodePackageVersionNotFound(DomainError):
    """Another organization's package answers exactly like a missing one."""

    code = "not_found"
    status = 404


class _JobInputs:
    """Resolve what a submission names (resource class, dataset version) or say what is wrong."""

    def _resource_class(self, name: str) -> ResourceClass:
        resource_class = selectors.resource_class_named(name)
        if resource_class is None:
            names = ", ".join(ResourceClass.objects.values_list("name", flat=True))
            raise DomainError(
                "Unknown resource class.", fields={"resource_class": [f"Choose one of {names}."]}
            )
        return resource_class

    def _dataset_version(self, ref: dict):
        try:
            return dataset_version_get(
                organization=self.organization,
                dataset_name=ref["dataset"],
                number=ref["number"],
                as_input=True,
            )
        except Http404 as exc:
            raise DomainError(
                f"Dataset {ref['dataset']} has no version {ref['number']}.",
                fields={"dataset": ["No such dataset version in this organization."]},
            ) from exc

    def _code_package_version(self, name: str, number: int):
        try:
            return code_package_version_get(
                organization=self.organization, package_name=name, number=number
            )
        except Http404 as exc:
            raise CodePackageVersionNotFound(
                f"Code package {name} has no version {number}.",
                fields={"code_package_version": ["No such code package version."]},
            ) from exc


def _job_row(*, organization: int, job: int):
    """One job's row as JobViewSet.retrieve reads it, through the tenancy seal as the view's
    own queryset is (tenants.seal.organization_rows)."""
    org = Organization(pk=organization)
    rows = organization_rows(
        model=Job, organization=org, narrow=lambda _: selectors.job_list(organization=org)
    )
    return s.job_rows(rows.filter(pk=job), versions=True)


_JOB_ROW = CompiledRows(_job_row, prepared=True, organization=int, job=int)


def _job_page(*, organization: int, limit: int):
    """The first `limit` rows of an unfiltered job list, in the list's order (its pagination's)."""
    org = Organization(pk=organization)
    rows = organization_rows(
        model=Job, organization=org, narrow=lambda _: selectors.job_list(organization=org)
    )
    return s.job_rows(rows, versions=True).order_by(*_PAGE_ORDER)[:limit]


_PAGE_ORDER = CreatedCursorPagination.ordering
_JOB_PAGES: dict[int, CompiledRows] = {}  # by limit, a page size plus one: at most 201
_JSON_PAGES: dict[int, CompiledSelect] = {}  # the same, each row as JSON built by PostgreSQL


class _FirstPage:
    """What CursorPagination reads a list's first page from, as from a queryset: its order and
    its slice run _job_page compiled once per page size; `as_json`, each row's JSON built by
    PostgreSQL (serializers.job_json_select), else values() rows."""

    def __init__(self, organization: int, *, as_json: bool = False) -> None:
        self.organization = organization
        self.as_json = as_json

    def order_by(self, *ordering: str) -> "_FirstPage":
        if tuple(ordering) != tuple(_PAGE_ORDER):
            raise ImproperlyConfigured(f"The first page is compiled in {_PAGE_ORDER} order.")
        return self

    def __getitem__(self, window: slice) -> list:
        if window.start or window.stop is None:
            raise ImproperlyConfigured("The first page is read from its start.")
        build = functools.partial(_job_page, limit=window.stop)
        if self.as_json:
            if window.stop not in _JSON_PAGES:
                _JSON_PAGES[window.stop] = CompiledSelect(
                    build, s.job_json_select, prepared=True, organization=int
                )
            rows = _JSON_PAGES[window.stop].fetch(organization=self.organization)
            if rows is None:
                raise ImproperlyConfigured("The JSON page needs its statement compiled.")
            return [s.JobJSONRow(row) for row in rows]
        if window.stop not in _JOB_PAGES:
            _JOB_PAGES[window.stop] = CompiledRows(build, prepared=True, organization=int)
        return _JOB_PAGES[window.stop].rows(organization=self.organization)


class _JSONResultsResponse(Response):
    """A page whose results are JSON texts already (the first page, built by PostgreSQL): DRF
    renders the rest (links) as on any page, and the results are joined in as they are."""

    def __init__(self, data: dict, results: list[str]) -> None:
        super().__init__(data)
        self.results = results

    @property
    def rendered_content(self) -> bytes:
        content = super().rendered_content
        empty = b'"results":[]}'
        if not (self.data["results"] == [] and content.endswith(empty)):
            # Another renderer or format (indented): render the results as parsed values.
            self.data["results"] = [json.loads(text) for text in self.results]
            return super().rendered_content
        # As DRF's JSONRenderer writes them, for JavaScript that reads JSON as code.
        results = ",".join(self.results).replace("\u2028", "\\u2028")
        results = results.replace("\u2029", "\\u2029")
        return content[: -len(empty)] + b'"results":[' + results.encode() + b"]}"


def _job_id(value: str | int) -> int | None:
    """The job id a URL names (text, or an int where the route converts it), or None where it
    names none a job can have (404, as a filter on the id would answer, never a database
    error)."""
    text = str(value)
    if not (text.isascii() and text.isdigit()):
        return None
    low, high = connection.ops.integer_field_range(Job._meta.pk.get_internal_type())
    return int(text) if low <= int(text) <= high else None


@extend_schema(tags=["jobs"])
@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("state", str, description="queued, running, succeeded, ..."),
            OpenApiParameter("label", str, description="`key` or `key=value`"),
            OpenApiParameter("created_by", str, description="Part of the submitter's email"),
        ]
    ),
    create=extend_schema(
        request=s.JobSubmitSerializer,
        responses={201: s.JobSubmittedSerializer, 200: s.JobSubmittedSerializer},
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                location=OpenApiParameter.HEADER,
                description="A retry with the same key returns the first job (200), not a new one.",
            )
        ],
    ),
    retrieve=extend_schema(responses=s.JobDetailSerializer),
    estimate=extend_schema(request=s.EstimateRequestSerializer, responses=s.EstimateSerializer),
    cancel=extend_schema(request=None, responses=s.JobSerializer),
    retry=extend_schema(request=None, responses={201: s.JobSerializer}),
    events=extend_schema(responses=s.JobEventSerializer(many=True)),
    logs=extend_schema(
        parameters=[
            OpenApiParameter("after", int, description="Only lines after this id (for tailing)")
        ],
        responses=s.JobLogSerializer(many=True),
    ),
    metrics=extend_schema(responses=s.JobMetricSerializer(many=True)),
    utilization=extend_schema(responses=s.UtilizationSampleSerializer(many=True)),
)
class JobViewSet(
    _JobInputs,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    OrganizationScopedViewSet,
):
    model = Job
    serializer_class = s.JobSerializer
    required_scopes = {
        "list": "jobs:read",
        "retrieve": "jobs:read",
        "events": "jobs:read",
        "logs": "jobs:read",
        "metrics": "jobs:read",
        "utilization": "jobs:read",
        "create": "jobs:write",
        "estimate": "jobs:read",
        "cancel": "jobs:write",
        "retry": "jobs:write",
    }
    effects = {"cancel": Effect.REDUCE}
    throttle_scopes = {"create": "submit", "retry": "submit"}

    def narrow_queryset(self, queryset):
        if self.action != "list":
            return selectors.job_list(organization=self.organization)
        filters = s.JobFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return selectors.job_list(organization=self.organization, **filters.validated_data)

    def _reads_compiled(self) -> bool:
        """Whether this view reads through the statements compiled from JobViewSet's own
        narrowing: a subclass that narrows or filters otherwise builds its queryset on every
        request, so the seal checks what it serves (tests/security/test_seal.py)."""
        view = type(self)
        return (
            view.narrow_queryset is JobViewSet.narrow_queryset
            and view.filter_backends is JobViewSet.filter_backends
            and view.filter_queryset is JobViewSet.filter_queryset
            and view.get_queryset is JobViewSet.get_queryset
        )

    # The reads answer from values() rows (serializers.job_rows_data), not model instances: the
    # same fields, a fraction of the CPU. One job and an unfiltered first page run statements
    # compiled once from the org-scoped queryset (_job_row, _job_page): building and compiling
    # it was most of what was left; other lists build it per request.
    def list(self, request, *args, **kwargs):
        if (
            self._reads_compiled()
            and isinstance(self.paginator, CreatedCursorPagination)
            and request.query_params.keys() <= {"page_size", "format"}
        ):
            # No cursor, no filter: the usual poll. On PostgreSQL each row's JSON is built by
            # the statement (serializers.job_json_select); DRF renders only the links.
            if connection.vendor == "postgresql" and timezone.get_current_timezone_name() == "UTC":
                page = self.paginate_queryset(_FirstPage(self.organization.pk, as_json=True))
                results = s.job_json_rows(rows=page, organization=self.organization)
                return _JSONResultsResponse(self.get_paginated_response([]).data, results)
            queryset = _FirstPage(self.organization.pk)
        else:
            queryset = s.job_rows(self.filter_queryset(self.get_queryset()))
        page = self.paginate_queryset(queryset)
        rows = page if page is not None else list(queryset)
        data = s.job_rows_data(rows=rows, organization=self.organization)
        return self.get_paginated_response(data) if page is not None else Response(data)

    def retrieve(self, request, *args, **kwargs):
        job_id = _job_id(self.kwargs[self.lookup_url_kwarg or self.lookup_field])
        if job_id is None:
            rows = []
        elif self._reads_compiled():
            # The statement compiled once (_JOB_ROW): the same org-scoped query, without
            # rebuilding and compiling it on every read.
            rows = _JOB_ROW.rows(organization=self.organization.pk, job=job_id)
        else:
            rows = list(
                s.job_rows(self.filter_queryset(self.get_queryset()), versions=True).filter(
                    pk=job_id
                )
            )
        if not rows:
            raise Http404
        self.check_object_permissions(request, rows[0])
        return Response(s.job_detail_data(row=rows[0], organization=self.organization))

    def create(self, request, *args, **kwargs):
        data = s.JobSubmitSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        ref = fields.pop("dataset", None)
        resource_class = self._resource_class(fields.pop("resource_class"))
        dataset_version = self._dataset_version(ref) if ref is not None else None
        model_ref = fields.pop("model", None)
        model_version = None
        if model_ref is not None:
            try:
                model_version = model_version_get(
                    organization=self.organization,
                    model_name=model_ref["model"],
                    ref=model_ref["version"],
                )
            except Http404 as exc:
                raise DomainError(
                    f"Model {model_ref['model']} has no version or alias {model_ref['version']!r}.",
                    fields={"model": ["No such model version in this organization."]},
                ) from exc
        options = services.JobOptions(
            resource_class=resource_class,
            gpu_count=fields["gpu_count"],
            priority=fields["priority"],
            max_runtime_s=fields["max_runtime_s"],
            labels=fields["labels"],
        )
        common = {
            "organization": self.organization,
            "actor": self.actor,
            "dataset_version": dataset_version,
            "options": options,
            "idempotency_key": request.headers.get("Idempotency-Key") or None,
        }
        if fields.get("code_package"):
            job, created = services.code_job_submit(
                code_package_version=self._code_package_version(
                    fields["code_package"], fields["code_package_version"]
                ),
                parameters=fields["parameters"],
                model_version=model_version,
                output_model_name=fields.get("output_model", ""),
                output_dataset_name=fields.get("output_dataset", ""),
                **common,
            )
        elif fields["kind"] == Job.Kind.EXPORT:
            if common.pop("dataset_version") is not None:
                raise DomainError(
                    "An export reads no dataset; name only the model version.",
                    fields={"dataset": ["Leave it out for an export."]},
                )
            job, created = services.export_job_submit(model_version=model_version, **common)
        elif fields["kind"] == Job.Kind.INFER:
            job, created = services.inference_job_submit(
                model_version=model_version,
                parameters=fields["parameters"],
                output_dataset_name=fields.get("output_dataset", ""),
                **common,
            )
        else:
            job, created = services.training_job_submit(
                recipe=fields.get("recipe", ""),
                model_version=model_version,
                parameters=fields["parameters"],
                output_model_name=fields.get("output_model", ""),
                **common,
            )
        # JobSubmittedSerializer's fields, built from the job without the serializer's
        # per-request field building (tests/jobs/test_api_rows.py compares the two).
        data = s.job_submitted_data(
            job=job,
            organization=self.organization,
            estimate=_estimate(job.resource_class, job.gpu_count, job.max_runtime_s),
        )
        return Response(data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)

    @action(detail=False, methods=["post"])
    def estimate(self, request, *args, **kwargs):
        """What a job would cost, before submitting it."""
        data = s.EstimateRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = data.validated_data
        resource_class = self._resource_class(fields["resource_class"])
        return Response(_estimate(resource_class, fields["gpu_count"], fields["max_runtime_s"]))

    @action(detail=True, methods=["post"])
    def cancel(self, request, *args, **kwargs):
        job = services.job_cancel(job=self.get_object(), actor=self.actor)
        return Response(s.JobSerializer(job).data)

    @action(detail=True, methods=["post"])
    def retry(self, request, *args, **kwargs):
        job = services.job_retry(job=self.get_object(), actor=self.actor)
        return Response(s.JobSerializer(job).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["get"], pagination_class=None)
    def events(self, request, *args, **kwargs):
        job = self.get_object()
        return Response(
            s.JobEventSerializer(
                JobEvent.objects.for_organization(self.organization).filter(job=job), many=True
            ).data
        )

    @action(detail=True, methods=["get"], pagination_class=None)
    def logs(self, request, *args, **kwargs):
        job = self.get_object()
        try:
            after = int(request.query_params.get("after", 0))
        except ValueError as exc:
            raise DomainError(
                "`after` must be a log line id.", fields={"after": ["An integer."]}
            ) from exc
        lines = (
            JobLog.objects.for_organization(self.organization)
            .filter(job=job, pk__gt=after)
            .order_by("pk")[:LOG_PAGE]
        )
        return Response(s.JobLogSerializer(lines, many=True).data)

    @action(detail=True, methods=["get"], pagination_class=None)
    def metrics(self, request, *args, **kwargs):
        job = self.get_object()
        points = (
            JobMetric.objects.for_organization(self.organization)
            .filter(job=job)
            .order_by("step", "pk")[:10_000]
        )
        return Response(s.JobMetricSerializer(points, many=True).data)

    @action(detail=True, methods=["get"], pagination_class=None)
    def utilization(self, request, *args, **kwargs):
        """The newest sampled attempt's utilization samples, oldest first: CPU cores and
        resident memory of its processes; on GPUs, utilization (%) and the fullest GPU's memory.
        The job's `utilization` field summarizes them."""
        job = self.get_object()
        samples = selectors.utilization_samples(organization=self.organization, job=job)
        return Response(s.UtilizationSampleSerializer(samples, many=True).data)


@extend_schema(tags=["jobs"], responses=s.RecipeSerializer(many=True))
class RecipeListView(generics.GenericAPIView):
    """The recipes a job can run, each with the JSON Schema of its parameters."""

    permission_classes = [permissions.IsAuthenticated]
    serializer_class = s.RecipeSerializer
    pagination_class = None

    def get(self, request):
        recipes = [
            {
                "name": name,
                "version": recipe.version,
                "kind": recipe.kind,
                "dataset_formats": list(recipe.dataset_formats),
                "parameter_schema": recipe.parameter_schema,
            }
            for name, recipe in sorted(list_recipes().items())
        ]
        return Response(recipes)


@extend_schema(tags=["jobs"], responses=s.ResourceClassSerializer(many=True))
class ResourceClassListView(generics.GenericAPIView):
    """GPU types (and `cpu`) with their current price."""

    permission_classes = [permissions.IsAuthenticated]
    serializer_class = s.ResourceClassSerializer
    pagination_class = None

    def get(self, request):
        return Response(
            [
                {
                    "name": rc.name,
                    "display_name": rc.display_name or rc.name,
                    "gpu_memory_gb": rc.gpu_memory_gb,
                    "price_per_gpu_hour": f"{price * 3600:.4f}",
                    "currency": currency,
                }
                for rc, price, currency in selectors.resource_classes_with_prices()
            ]
        )


class OnlinePredictionMoved(DomainError):
    code = "online_prediction_moved"
    status = 410


@extend_schema(
    tags=["models"],
    request=None,
    responses={
        410: OpenApiResponse(
            description=(
                'Always: {"code": "online_prediction_moved", "detail"}. Predict through a '
                "deployment: POST /api/v1/orgs/<slug>/deployments/<name>/predict/."
            )
        )
    },
    deprecated=True,
)
class ModelPredictView(OrganizationScopedAPIView):
    """Gone: online predictions answer through deployments, whose replicas load the model on the
    pool (routing, canary, prediction log, metering), not in the web process."""

    model = RegisteredModel  # another organization's model is still a 404, not a hint
    lookup_field = "name"
    # Whoever may see the model is told where its predictions went; nothing is read or spent.
    required_scopes = {"post": "models:read"}
    effects = {"post": Effect.READ}

    def post(self, request, org_slug, name):
        raise OnlinePredictionMoved(
            f"Online prediction moved to deployments: route a version of {name} to a deployment "
            f"(POST /api/v1/orgs/{org_slug}/deployments/, or the Deployments page) and send "
            f"POST /api/v1/orgs/{org_slug}/deployments/<deployment>/predict/ with "
            '{"inputs": [...]} and a key with the predict scope. Batch predictions stay jobs '
            "of kind infer."
        )


@extend_schema(tags=["jobs"])
@extend_schema_view(
    create=extend_schema(request=s.SweepCreateSerializer, responses={201: s.SweepSerializer}),
    cancel=extend_schema(request=None, responses=s.SweepSerializer),
)
class SweepViewSet(
    _JobInputs,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    OrganizationScopedViewSet,
):
    """Hyperparameter sweeps; the best trial's model version gets the alias `best`."""

    model = Sweep
    serializer_class = s.SweepSerializer
    required_scopes = {
        "list": "jobs:read",
        "retrieve": "jobs:read",
        "create": "jobs:write",
        "cancel": "jobs:write",
    }
    effects = {"cancel": Effect.REDUCE}
    throttle_scopes = {"create": "submit"}

    def create(self, request, *args, **kwargs):
        data = s.SweepCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        ref = fields.pop("dataset")
        sweep = sweeps.sweep_create(
            organization=self.organization,
            actor=self.actor,
            dataset_version=self._dataset_version(ref),
            resource_class=self._resource_class(fields.pop("resource_class")),
            base_parameters=fields.pop("parameters"),
            **fields,
        )
        return Response(s.SweepSerializer(sweep).data, status=status.HTTP_201_CREATED)

    @action(detail=True, methods=["post"])
    def cancel(self, request, *args, **kwargs):
        sweep = sweeps.sweep_cancel(sweep=self.get_object(), actor=self.actor)
        return Response(s.SweepSerializer(sweep).data)
