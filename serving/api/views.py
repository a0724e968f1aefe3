from datetime import timedelta

from django.conf import settings
from django.db.models import Prefetch
from django.utils import timezone
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.response import Response

from jobs.models import ResourceClass
from serving import counters, gate, gateway, selectors, services
from serving.models import Deployment, ModelCard, Retrain, Route
from tenants.api.base import OrganizationScopedViewSet
from tenants.errors import ConflictError, DomainError
from tenants.standing import Effect

from . import serializers as s

ERROR = OpenApiResponse(description='The error shape: {"code", "detail", "fields"?}.')


class PayloadTooLarge(DomainError):
    code = "payload_too_large"
    status = 413


def _resource_class(name: str) -> ResourceClass:
    resource_class = ResourceClass.objects.filter(name=name).first()
    if resource_class is None:
        names = ", ".join(ResourceClass.objects.values_list("name", flat=True))
        raise DomainError(
            "Unknown resource class.", fields={"resource_class": [f"Choose one of {names}."]}
        )
    return resource_class


def _refuse_large_body(request, limit: int) -> None:
    """Before the body is read: a declared length over the limit is a 413, not a parse."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit:
        raise PayloadTooLarge(
            f"The body is {length:,} bytes; at most {limit:,}. Send fewer inputs per request."
        )


@extend_schema(tags=["deployments"])
@extend_schema_view(
    create=extend_schema(
        request=s.DeploymentCreateSerializer, responses={201: s.DeploymentSerializer}
    ),
    partial_update=extend_schema(
        request=s.DeploymentUpdateSerializer, responses=s.DeploymentSerializer
    ),
    routes=extend_schema(request=s.RoutesSetSerializer, responses=s.RouteSerializer(many=True)),
    replicas=extend_schema(responses=s.ReplicaSerializer(many=True)),
    timeline=extend_schema(responses=s.LoopEventSerializer(many=True)),
    retrains=extend_schema(responses=s.RetrainSerializer(many=True)),
    stats=extend_schema(
        parameters=[OpenApiParameter("hours", int, description="The window: the last n hours.")],
        responses=s.StatsSerializer,
    ),
    predict=extend_schema(
        request=s.DeploymentPredictSerializer,
        responses={200: s.DeploymentPredictResponseSerializer, 502: ERROR, 503: ERROR},
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                str,
                location=OpenApiParameter.HEADER,
                description=(
                    "A retry with the same key and inputs within IDEMPOTENCY_WINDOW_S gets the "
                    "first answer (the same prediction ids) and is billed once."
                ),
            ),
            OpenApiParameter(
                "X-Routing-Key",
                str,
                location=OpenApiParameter.HEADER,
                description=(
                    "Sticky routing: the same key gets the same model version while the "
                    "deployment's weights stand (e.g. a user id; hashed, never stored)."
                ),
            ),
        ],
    ),
    feedback=extend_schema(request=s.FeedbackSerializer, responses=s.FeedbackResultSerializer),
    datasets=extend_schema(
        request=s.FeedbackDatasetSerializer, responses={201: s.SavedDatasetSerializer}
    ),
)
class DeploymentViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    OrganizationScopedViewSet,
):
    """Deployments: named endpoints that answer from routed model versions on pool replicas."""

    model = Deployment
    serializer_class = s.DeploymentSerializer
    lookup_field = "name"
    http_method_names = ["get", "post", "put", "patch", "delete", "head"]
    required_scopes = {
        "list": "deployments:read",
        "retrieve": "deployments:read",
        "replicas": "deployments:read",
        "timeline": "deployments:read",
        "retrains": "deployments:read",
        "stats": "deployments:read",
        "create": "deployments:write",
        "partial_update": "deployments:write",
        "destroy": "deployments:write",
        "routes": "deployments:write",
        "predict": "predict",
        # Whoever makes predictions learns their outcomes: a key made to predict may label them,
        # without the right to change the deployment.
        "feedback": "predict",
        "datasets": "datasets:write",
    }
    # Labels cost nothing; saving them as a dataset stores bytes (spending, by its scope).
    effects = {"feedback": Effect.CHANGE}
    throttle_scopes = {"predict": "predict"}

    def narrow_queryset(self, queryset):
        routes = Route.objects.select_related("model_version__registered_model")
        return queryset.select_related("resource_class", "organization").prefetch_related(
            Prefetch("routes", queryset=routes)
        )

    def create(self, request, *args, **kwargs):
        data = s.DeploymentCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        deployment = services.deployment_create(
            organization=self.organization,
            name=fields.pop("name"),
            recipe=fields.pop("recipe"),
            resource_class=_resource_class(fields.pop("resource_class")),
            routes=fields.pop("routes", None),
            actor=self.actor,
            **fields,
        )
        return Response(
            s.DeploymentSerializer(self.get_queryset().get(pk=deployment.pk)).data,
            status=status.HTTP_201_CREATED,
        )

    def partial_update(self, request, *args, **kwargs):
        data = s.DeploymentUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        deployment = services.deployment_update(
            deployment=self.get_object(), actor=self.actor, **data.validated_data
        )
        return Response(s.DeploymentSerializer(self.get_queryset().get(pk=deployment.pk)).data)

    def perform_destroy(self, instance):
        services.deployment_delete(deployment=instance, actor=self.actor)

    @action(detail=True, methods=["put"], pagination_class=None)
    def routes(self, request, *args, **kwargs):
        """Replace the routes: live weights add up to 100; shadow routes get a copy of that
        percent of requests, never answer."""
        data = s.RoutesSetSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        made = services.routes_set(
            deployment=self.get_object(), routes=data.validated_data["routes"], actor=self.actor
        )
        routes = (
            Route.objects.for_organization(self.organization)
            .filter(pk__in=[r.pk for r in made])
            .select_related("model_version__registered_model")
        )
        return Response(s.RouteSerializer(routes, many=True).data)

    @action(detail=True, methods=["get"])
    def replicas(self, request, *args, **kwargs):
        rows = selectors.replica_list(deployment=self.get_object())
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(s.ReplicaSerializer(page, many=True).data)

    @action(detail=True, methods=["get"])
    def timeline(self, request, *args, **kwargs):
        rows = selectors.timeline_list(deployment=self.get_object())
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(s.LoopEventSerializer(page, many=True).data)

    @action(detail=True, methods=["get"])
    def retrains(self, request, *args, **kwargs):
        """The deployment's retrains, newest first: state, champion and challenger, the training
        and evaluation jobs with their costs, and the gate's decision."""
        rows = selectors.retrain_list(organization=self.organization, deployment=self.get_object())
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(s.RetrainSerializer(page, many=True).data)

    @action(detail=True, methods=["get"], pagination_class=None)
    def stats(self, request, *args, **kwargs):
        """Per routed version, live and shadow: requests, errors, latency and the live metric
        over the labelled predictions of the window."""
        query = s.StatsQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        deployment = self.get_object()
        until = timezone.now()
        since = until - timedelta(hours=query.validated_data["hours"])
        metric, _higher = selectors.live_metric_of(deployment.recipe)
        versions = []
        for mode in Route.Mode.values:
            stats = selectors.version_stats(
                deployment=deployment, since=since, until=until, mode=mode
            )
            for version_id, row in sorted(stats.items()):
                versions.append(
                    {
                        "model_version": version_id,
                        "mode": mode,
                        "requests": row.requests,
                        "errors": row.errors,
                        "error_rate": row.error_rate,
                        "p50_ms": row.p50_ms,
                        "p99_ms": row.p99_ms,
                        "labelled": row.labelled,
                        "metric": metric,
                        "metric_value": row.metric,
                    }
                )
        return Response(
            {
                "since": since,
                "until": until,
                "versions": versions,
                "shadow_copies_dropped": counters.shadow_dropped_count(deployment.pk),
            }
        )

    @action(detail=True, methods=["post"])
    def predict(self, request, *args, **kwargs):
        """Predict with the deployment: each output comes with its prediction id, for feedback.
        503 with Retry-After while no replica is ready (one is being started)."""
        _refuse_large_body(request, settings.SERVING_MAX_BODY_BYTES)
        data = s.DeploymentPredictSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        # Not get_object(): the gateway reads the deployment, its routes and replicas at most
        # every SERVING_ROUTING_CACHE_S (gateway.routing_read), in this organization only.
        answer = gateway.predict(
            organization=self.resolve_organization(),
            name=kwargs[self.lookup_field],
            inputs=data.validated_data["inputs"],
            actor=self.actor,
            routing_key=request.headers.get("X-Routing-Key"),
            idempotency_key=request.headers.get("Idempotency-Key") or None,
        )
        return Response(answer)

    @action(detail=True, methods=["post"])
    def feedback(self, request, *args, **kwargs):
        """Labels for this deployment's predictions, by prediction id. Ids that are not this
        deployment's logged predictions are counted as unknown and never written."""
        _refuse_large_body(request, settings.SERVING_MAX_BODY_BYTES)
        data = s.FeedbackSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        result = services.feedback_record(
            deployment=self.get_object(), items=data.validated_data["items"], actor=self.actor
        )
        return Response(result)

    @action(detail=True, methods=["post"])
    def datasets(self, request, *args, **kwargs):
        """Save a window of labelled live predictions as a new dataset version (CSV: the inputs,
        then the label column)."""
        data = s.FeedbackDatasetSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = data.validated_data
        version = services.feedback_dataset_save(
            deployment=self.get_object(),
            since=fields["since"],
            until=fields["until"],
            dataset_name=fields["dataset"],
            target=fields["target"],
            actor=self.actor,
        )
        return Response(
            {
                "dataset": version.dataset.name,
                "number": version.number,
                "row_count": version.row_count,
            },
            status=status.HTTP_201_CREATED,
        )


@extend_schema(tags=["deployments"])
@extend_schema_view(
    retrieve=extend_schema(responses=s.RetrainDetailSerializer),
    approve=extend_schema(
        request=None, responses={200: s.RetrainDetailSerializer, 403: ERROR, 409: ERROR}
    ),
    reject=extend_schema(
        request=s.RetrainRejectSerializer,
        responses={200: s.RetrainDetailSerializer, 403: ERROR, 409: ERROR},
    ),
)
class RetrainViewSet(mixins.RetrieveModelMixin, OrganizationScopedViewSet):
    """A retrain of a deployment with its model card; a person with `models:promote` approves or
    rejects a challenger that passed the gate and awaits approval."""

    model = Retrain
    serializer_class = s.RetrainDetailSerializer
    http_method_names = ["get", "post", "head"]
    required_scopes = {
        "retrieve": "deployments:read",
        # The gate checks the scope again in the card's organization (serving/gate.py).
        "approve": gate.PROMOTE_SCOPE,
        "reject": gate.PROMOTE_SCOPE,
    }
    # Approving starts a canary, and the canary's replicas cost slot-seconds; turning a
    # challenger down stops a retrain, which lowers spend.
    effects = {"approve": Effect.SPEND, "reject": Effect.REDUCE}

    def narrow_queryset(self, queryset):
        # A deleted deployment's retrains went with it (they are purged after).
        return queryset.filter(deployment__deleted_at__isnull=True).select_related(
            "deployment",
            "champion__registered_model",
            "challenger__registered_model",
            "job",
            "evaluation_job",
            "model_card__model_version__registered_model",
            "model_card__champion__registered_model",
        )

    def _card(self) -> ModelCard:
        retrain = self.get_object()
        card = s.model_card_of(retrain)
        if card is None:
            raise ConflictError(
                f"This retrain has no model card yet (it is {retrain.state}); the gate has not "
                "decided."
            )
        return card

    def _answer(self, retrain: Retrain) -> Response:
        return Response(s.RetrainDetailSerializer(self.get_queryset().get(pk=retrain.pk)).data)

    @action(detail=True, methods=["post"])
    def approve(self, request, *args, **kwargs):
        """Let a challenger that passed the gate into a canary at the policy's share."""
        return self._answer(gate.gate_approve(card=self._card(), actor=self.actor))

    @action(detail=True, methods=["post"])
    def reject(self, request, *args, **kwargs):
        """Turn down a challenger awaiting approval; the reason goes on its model card."""
        data = s.RetrainRejectSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        retrain = gate.gate_reject(
            card=self._card(), actor=self.actor, reason=data.validated_data["reason"]
        )
        return self._answer(retrain)
