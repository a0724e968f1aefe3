from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import generics, mixins, permissions, status
from rest_framework.response import Response

from tenants import selectors, services
from tenants.actors import Actor
from tenants.models import ApiKey, AuditEvent, Invitation, Membership, Organization

from . import serializers as s
from .base import OrganizationScopedAPIView, OrganizationScopedViewSet
from .permissions import IsUserSession


class _ListReadCreateBySession(permissions.BasePermission):
    def has_permission(self, request, view):
        if request.method in permissions.SAFE_METHODS:
            return bool(request.user and request.user.is_authenticated)
        return IsUserSession().has_permission(request, view)


@extend_schema(tags=["organizations"])
class OrganizationListView(generics.GenericAPIView):
    """Organizations the caller belongs to (an API key sees only its own); create one."""

    permission_classes = [_ListReadCreateBySession]
    serializer_class = s.OrganizationSerializer
    pagination_class = None
    # Each organization costs money at once (trial credit, storage, a Stripe customer).
    throttle_scopes = {"post": "org_create"}

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Organization.objects.none()
        if self.request.auth is not None:
            return Organization.objects.filter(pk=self.request.auth.organization_id)
        return selectors.organization_list_for_user(user=self.request.user)

    @extend_schema(operation_id="orgs_list", responses=s.OrganizationSerializer(many=True))
    def get(self, request):
        return Response(self.get_serializer(self.get_queryset(), many=True).data)

    @extend_schema(
        request=s.OrganizationCreateSerializer, responses={201: s.OrganizationSerializer}
    )
    def post(self, request):
        data = s.OrganizationCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        organization = services.organization_create(
            name=data.validated_data["name"], owner=request.user, actor=Actor.from_request(request)
        )
        return Response(s.OrganizationSerializer(organization).data, status=status.HTTP_201_CREATED)


@extend_schema(tags=["organizations"])
class OrganizationDetailView(OrganizationScopedAPIView):
    required_scopes = {"get": "org:read", "patch": "org:admin"}
    serializer_class = s.OrganizationSerializer

    def get(self, request, org_slug):
        return Response(s.OrganizationSerializer(self.organization).data)

    @extend_schema(request=s.OrganizationCreateSerializer)
    def patch(self, request, org_slug):
        data = s.OrganizationCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        organization = services.organization_update(
            organization=self.organization, name=data.validated_data["name"], actor=self.actor
        )
        return Response(s.OrganizationSerializer(organization).data)


@extend_schema(tags=["members"])
@extend_schema_view(partial_update=extend_schema(request=s.MemberRoleSerializer))
class MemberViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    mixins.DestroyModelMixin,
    OrganizationScopedViewSet,
):
    model = Membership
    serializer_class = s.MemberSerializer
    http_method_names = ["get", "patch", "delete", "head"]
    required_scopes = {
        "list": "members:read",
        "retrieve": "members:read",
        "partial_update": "members:owner",
        "destroy": "members:owner",
    }

    def narrow_queryset(self, queryset):
        return queryset.select_related("user")

    def update(self, request, *args, **kwargs):
        membership = self.get_object()
        data = s.MemberRoleSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership = services.membership_change_role(
            membership=membership, role=data.validated_data["role"], actor=self.actor
        )
        return Response(s.MemberSerializer(membership).data)

    def perform_destroy(self, instance):
        services.membership_remove(membership=instance, actor=self.actor)


@extend_schema(tags=["members"])
@extend_schema_view(
    create=extend_schema(
        request=s.InvitationCreateSerializer,
        responses={201: s.InvitationSerializer},
        description=(
            "Invite an address into a role whose every scope the caller holds (an owner needs "
            "`members:owner`). The link goes only to the invited address, by e-mail."
        ),
    ),
    destroy=extend_schema(description="Revoke a pending invitation."),
)
class InvitationViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    OrganizationScopedViewSet,
):
    model = Invitation
    serializer_class = s.InvitationSerializer
    required_scopes = {
        "list": "members:read",
        "retrieve": "members:read",
        "create": "members:admin",
        "destroy": "members:admin",
    }
    throttle_scopes = {"create": "invite"}

    def narrow_queryset(self, queryset):
        return queryset.select_related("invited_by")

    def create(self, request, *args, **kwargs):
        data = s.InvitationCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        invitation = services.invitation_create(
            organization=self.organization, actor=self.actor, **data.validated_data
        )
        return Response(s.InvitationSerializer(invitation).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        services.invitation_revoke(invitation=instance, actor=self.actor)


@extend_schema(tags=["api keys"])
@extend_schema_view(
    create=extend_schema(
        request=s.ApiKeyCreateSerializer,
        responses={201: s.ApiKeyCreatedSerializer},
        description=(
            "Only a signed-in session creates keys; a request made with an API key gets 403, so "
            "a leaked key cannot make itself permanent."
        ),
    ),
    destroy=extend_schema(description="Revoke the key; it stops working on the next request."),
)
class ApiKeyViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    OrganizationScopedViewSet,
):
    """Your own keys; with `keys:admin`, every key of the organization."""

    model = ApiKey
    serializer_class = s.ApiKeySerializer
    required_scopes = {
        "list": "keys:write",
        "retrieve": "keys:write",
        "create": "keys:write",
        "destroy": "keys:write",
    }
    session_only_actions = frozenset({"create"})

    def narrow_queryset(self, queryset):
        if not self.has_scope("keys:admin"):
            queryset = queryset.filter(created_by=self.request.user)
        return queryset.select_related("created_by")

    def create(self, request, *args, **kwargs):
        data = s.ApiKeyCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        api_key, token = services.api_key_create(
            organization=self.organization, actor=self.actor, **data.validated_data
        )
        api_key.key = token
        return Response(s.ApiKeyCreatedSerializer(api_key).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        services.api_key_revoke(api_key=instance, actor=self.actor)


@extend_schema(tags=["audit"])
@extend_schema_view(
    list=extend_schema(
        parameters=[
            OpenApiParameter("action", str, description="Action prefix, e.g. `member.`"),
            OpenApiParameter("actor", str, description="Part of the actor's email or key prefix"),
            OpenApiParameter("since", str, description="ISO 8601 time, inclusive"),
            OpenApiParameter("until", str, description="ISO 8601 time, exclusive"),
        ]
    )
)
class AuditEventViewSet(mixins.ListModelMixin, OrganizationScopedViewSet):
    model = AuditEvent
    serializer_class = s.AuditEventSerializer
    required_scopes = {"list": "audit:read"}

    def narrow_queryset(self, queryset):
        filters = s.AuditEventFilterSerializer(data=self.request.query_params)
        filters.is_valid(raise_exception=True)
        return selectors.audit_event_list(organization=self.organization, **filters.validated_data)


@extend_schema(tags=["members"])
class InvitationAcceptView(generics.GenericAPIView):
    """Accept an invitation as the signed-in user whose address it was sent to."""

    permission_classes = [IsUserSession]
    serializer_class = s.InvitationAcceptSerializer

    @extend_schema(responses={201: s.MemberSerializer})
    def post(self, request):
        data = s.InvitationAcceptSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        membership = services.invitation_accept(
            token=data.validated_data["token"], user=request.user, actor=Actor.from_request(request)
        )
        return Response(s.MemberSerializer(membership).data, status=status.HTTP_201_CREATED)
