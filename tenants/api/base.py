"""Org-scoped API views: the organization comes from the URL and filters every query.

Subclasses cannot override `get_queryset` or `get_object`; they narrow the organization's rows
through `narrow_queryset`, so forgetting the tenant filter is impossible.
"""

from rest_framework import viewsets

from tenants.actors import Actor
from tenants.selectors import organization_access
from tenants.standing import Effect

from .permissions import HasOrganizationScope


class OrganizationScopedMixin:
    permission_classes = [HasOrganizationScope]
    # The scope each action (viewsets) or method (plain views) needs; absent means denied.
    required_scopes: dict[str, str] = {}
    # Per action, where the scope alone would misjudge what a write does (tenants.standing).
    effects: dict[str, Effect] = {}
    # Per action, the stricter rate bucket of a costly operation (tenants.api.throttles).
    throttle_scopes: dict[str, str] = {}
    http_method_names = ["get", "post", "put", "patch", "delete", "head"]
    metadata_class = None

    organization = None
    membership = None
    granted_scopes: frozenset[str] = frozenset()

    def resolve_organization(self):
        if self.organization is None:
            self.organization, self.membership, self.granted_scopes = organization_access(
                slug=self.kwargs["org_slug"], user=self.request.user, api_key=self.request.auth
            )
        return self.organization

    @property
    def actor(self) -> Actor:
        return Actor.from_request(self.request)

    def has_scope(self, scope: str) -> bool:
        return scope in self.granted_scopes


class OrganizationScopedViewSet(OrganizationScopedMixin, viewsets.GenericViewSet):
    model = None  # the tenant-owned model this viewset serves

    _sealed = ("get_queryset", "get_object")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Compared by identity, so an override arriving through a mixin is caught too.
        overridden = [
            name
            for name in cls._sealed
            if getattr(cls, name) is not getattr(OrganizationScopedViewSet, name)
        ]
        if overridden:
            raise TypeError(
                f"{cls.__name__} overrides {', '.join(overridden)}; narrow the organization's "
                "rows in narrow_queryset() instead."
            )

    def narrow_queryset(self, queryset):
        return queryset

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):  # schema generation has no organization
            return self.model.objects.none()
        queryset = self.model.objects.for_organization(self.resolve_organization())
        return self.narrow_queryset(queryset)
