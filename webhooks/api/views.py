"""Webhook endpoints, their secrets and their delivery log, under /api/v1/orgs/<org>/."""

from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.response import Response

from tenants.api.base import OrganizationScopedViewSet
from tenants.standing import Effect
from webhooks import selectors, services
from webhooks.models import WebhookDelivery, WebhookEndpoint

from . import serializers as s


@extend_schema(tags=["webhooks"])
@extend_schema_view(
    create=extend_schema(
        request=s.WebhookEndpointCreateSerializer,
        responses={201: s.WebhookEndpointCreatedSerializer},
        description=(
            "A new endpoint. Its URL must be http(s) and resolve only to public addresses. The "
            "response carries the signing secret, shown only here."
        ),
    ),
    partial_update=extend_schema(
        request=s.WebhookEndpointUpdateSerializer, responses={200: s.WebhookEndpointSerializer}
    ),
    destroy=extend_schema(description="Delete the endpoint and its delivery log."),
)
class WebhookEndpointViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    OrganizationScopedViewSet,
):
    model = WebhookEndpoint
    serializer_class = s.WebhookEndpointSerializer
    http_method_names = ["get", "post", "patch", "delete", "head"]
    required_scopes = {
        "list": "webhooks:read",
        "retrieve": "webhooks:read",
        "deliveries": "webhooks:read",
        "create": "webhooks:admin",
        "partial_update": "webhooks:admin",
        "destroy": "webhooks:admin",
        "rotate": "webhooks:admin",
        "test": "webhooks:admin",
    }
    effects = {"destroy": Effect.REDUCE}

    def create(self, request, *args, **kwargs):
        data = s.WebhookEndpointCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        endpoint, secret = services.endpoint_create(
            organization=self.organization, actor=self.actor, **data.validated_data
        )
        endpoint.secret = secret
        return Response(
            s.WebhookEndpointCreatedSerializer(endpoint).data, status=status.HTTP_201_CREATED
        )

    def partial_update(self, request, *args, **kwargs):
        data = s.WebhookEndpointUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        endpoint = services.endpoint_update(
            endpoint=self.get_object(), actor=self.actor, **data.validated_data
        )
        return Response(s.WebhookEndpointSerializer(endpoint).data)

    def perform_destroy(self, instance):
        services.endpoint_delete(endpoint=instance, actor=self.actor)

    @extend_schema(request=s.WebhookRotateSerializer, responses={200: s.WebhookSecretSerializer})
    @action(detail=True, methods=["post"])
    def rotate(self, request, *args, **kwargs):
        """A new signing secret, shown only in this response; the old one keeps signing too
        for the overlap, so receivers switch without missing a delivery."""
        data = s.WebhookRotateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        secret = services.endpoint_secret_rotate(
            endpoint=self.get_object(), actor=self.actor, **data.validated_data
        )
        return Response({"secret": secret})

    @extend_schema(request=None, responses={202: s.WebhookDeliverySerializer})
    @action(detail=True, methods=["post"])
    def test(self, request, *args, **kwargs):
        """Send a `webhook.test` event to this endpoint alone (also while it is disabled)."""
        delivery = services.endpoint_test_send(endpoint=self.get_object(), actor=self.actor)
        return Response(s.WebhookDeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        responses={200: s.WebhookDeliverySerializer(many=True)},
        parameters=[
            OpenApiParameter("state", str, enum=WebhookDelivery.State.values, required=False)
        ],
    )
    @action(detail=True, methods=["get"])
    def deliveries(self, request, *args, **kwargs):
        """The endpoint's deliveries, newest first."""
        state = request.query_params.get("state")
        rows = selectors.delivery_list(
            organization=self.organization,
            endpoint=self.get_object(),
            state=state if state in WebhookDelivery.State.values else None,
        )
        page = self.paginate_queryset(rows)
        return self.get_paginated_response(s.WebhookDeliverySerializer(page, many=True).data)


@extend_schema(tags=["webhooks"])
class WebhookDeliveryViewSet(mixins.RetrieveModelMixin, OrganizationScopedViewSet):
    """One delivery: its payload and every try with the receiver's answer."""

    model = WebhookDelivery
    serializer_class = s.WebhookDeliveryDetailSerializer
    required_scopes = {"retrieve": "webhooks:read", "resend": "webhooks:admin"}

    def narrow_queryset(self, queryset):
        return queryset.select_related("event").prefetch_related("tries")

    @extend_schema(request=None, responses={202: s.WebhookDeliverySerializer})
    @action(detail=True, methods=["post"])
    def resend(self, request, *args, **kwargs):
        """Send it again, with the same `webhook-id`, owed afresh for three days."""
        delivery = services.delivery_resend(delivery=self.get_object(), actor=self.actor)
        return Response(s.WebhookDeliverySerializer(delivery).data, status=status.HTTP_202_ACCEPTED)
