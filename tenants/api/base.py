"""Org-scoped API views: the organization comes from the URL and filters every query.

Two sealed bases, and nothing else, serve tenant data:

- `OrganizationScopedViewSet` for a model's rows: `get_queryset` and `get_object` start from the
  organization's rows; subclasses narrow them through `narrow_queryset`, and a narrowing that
  drops the filter is refused (`tenants.seal`).
- `OrganizationScopedAPIView` for everything else (a summary, a report, a Stripe link): handlers
  read the resolved `self.organization`; a URL that names an object (`<name>`, `<pk>`) needs a
  `model`, and the base finds that object through the organization's rows (404 otherwise) before
  any handler runs, as `self.object`.

Subclasses cannot override the methods that resolve the organization or build the queryset, nor
drop `HasOrganizationScope` from their permissions; a class built on `OrganizationScopedMixin`
alone is refused at import.
"""

from rest_framework import generics, viewsets

from tenants.actors import Actor
from tenants.seal import SealBroken, checked_rows, organization_rows, refuse_unsealed
from tenants.selectors import organization_access
from tenants.standing import Effect

from .permissions import HasOrganizationScope


class OrganizationScopedMixin:
    permission_classes = [HasOrganizationScope]
    # The scope each action (viewsets) or method (plain views) needs; absent means denied.
    required_scopes: dict[str, str] = {}
    # Actions (or methods) only a signed-in person may take, never an API key, whatever its scopes.
    session_only_actions: frozenset[str] = frozenset()
    # Per action, where the scope alone would misjudge what a write does (tenants.standing).
    effects: dict[str, Effect] = {}
    # Per action, the stricter rate bucket of a costly operation (tenants.api.throttles).
    throttle_scopes: dict[str, str] = {}
    http_method_names = ["get", "post", "put", "patch", "delete", "head"]
    metadata_class = None
    model = None  # the tenant-owned model the view serves (viewsets) or finds by URL (views)

    organization = None
    membership = None
    granted_scopes: frozenset[str] = frozenset()

    # Set to True only in the body of a sealed base below.
    _seal_base = False
    _sealed = (
        "get_queryset",
        "filter_queryset",
        "get_object",
        "initial",
        "get_permissions",
        "check_permissions",
        "resolve_organization",
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_seal_base"):
            return
        seal = next((k for k in cls.__mro__ if k.__dict__.get("_seal_base")), None)
        if seal is None:
            raise TypeError(
                f"{cls.__name__} is built on OrganizationScopedMixin alone; inherit "
                "OrganizationScopedViewSet (a model's rows) or OrganizationScopedAPIView "
                "(anything else) so the organization filter cannot be lost."
            )
        refuse_unsealed(cls, seal)
        if list(cls.permission_classes[:1]) != [HasOrganizationScope]:
            raise TypeError(
                f"{cls.__name__}.permission_classes must start with HasOrganizationScope, "
                "which resolves the organization (404 for outsiders) before anything else."
            )

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

    def narrow_queryset(self, queryset):
        return queryset

    def get_queryset(self):
        if self.model is None:
            raise SealBroken(f"{type(self).__name__} names no model, so it has no rows to serve.")
        if getattr(self, "swagger_fake_view", False):  # schema generation has no organization
            return self.model.objects.none()
        return organization_rows(
            model=self.model, organization=self.resolve_organization(), narrow=self.narrow_queryset
        )

    def filter_queryset(self, queryset):
        # Filter backends (none by default) may only narrow further, like narrow_queryset.
        return checked_rows(
            super().filter_queryset(queryset),
            model=self.model,
            organization=self.resolve_organization(),
            source=f"{type(self).__name__} filter backends",
        )


# No docstrings on the two bases: the OpenAPI schema would show them on every subclass without
# one of its own.
class OrganizationScopedViewSet(OrganizationScopedMixin, viewsets.GenericViewSet):
    _seal_base = True


class OrganizationScopedAPIView(OrganizationScopedMixin, generics.GenericAPIView):
    _seal_base = True
    object = None

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)  # authentication, then HasOrganizationScope
        named = set(self.kwargs) - {"org_slug"}
        if not named:
            return
        lookup = self.lookup_url_kwarg or self.lookup_field
        if self.model is None or named != {lookup}:
            raise SealBroken(
                f"{type(self).__name__} takes {', '.join(sorted(named))} from the URL but "
                + ("names no model" if self.model is None else f"looks up only {lookup!r}")
                + " to find it in; set `model` and `lookup_field` to the one URL parameter."
            )
        self.object = self.get_object()
