"""Org-scoped dashboard pages: login, membership (else 404), the method's scope, the
organization's standing, and for form posts the API's rate limits."""

from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import PermissionDenied
from django.shortcuts import get_object_or_404, render

from tenants.actors import Actor
from tenants.api.throttles import throttle_wait
from tenants.selectors import organization_access
from tenants.standing import Effect, OrganizationRestricted, action_effect, standing_check


class OrganizationPageMixin(LoginRequiredMixin):
    # The scope each HTTP method needs; a method not listed is not allowed (405).
    required_scopes: dict[str, str] = {}
    # Per method, where the scope alone would misjudge what a write does (tenants.standing).
    effects: dict[str, Effect] = {}
    # Per method, the stricter rate bucket of a costly operation (tenants.api.throttles).
    throttle_scopes: dict[str, str] = {}
    model = None  # for pages about one tenant-owned object, found by `pk` within the organization

    organization = None
    membership = None
    granted_scopes: frozenset[str] = frozenset()

    def dispatch(self, request, *args, **kwargs):
        if not request.user.is_authenticated:
            return self.handle_no_permission()
        self.organization, self.membership, self.granted_scopes = organization_access(
            slug=kwargs["org_slug"], user=request.user
        )
        method = request.method.lower()
        if method == "head":
            method = "get"
        scope = self.required_scopes.get(method)
        if scope is None:
            return self.http_method_not_allowed(request, *args, **kwargs)
        if scope not in self.granted_scopes:
            raise PermissionDenied(f"This page needs the {scope} scope, which your role lacks.")
        # Assigning marks the session modified, which writes its row on every page view.
        if request.session.get("current_org") != self.organization.slug:
            request.session["current_org"] = self.organization.slug
        request.organization, request.organization_scopes = self.organization, self.granted_scopes
        effect = action_effect(view=self, action=method, method=method, scope=scope)
        try:
            standing_check(organization=self.organization, effect=effect)
        except OrganizationRestricted as refused:
            return render(
                request,
                "tenants/restricted.html",
                {"restriction": refused.restriction},
                status=refused.status,
            )
        # Form posts count against the API's buckets, so the dashboard is no way around them.
        if method != "get" and (wait := throttle_wait(request, self)) is not None:
            response = render(request, "tenants/throttled.html", {"wait": wait}, status=429)
            response["Retry-After"] = str(wait)
            return response
        return super().dispatch(request, *args, **kwargs)

    @property
    def actor(self) -> Actor:
        return Actor.from_request(self.request)

    def has_scope(self, scope: str) -> bool:
        return scope in self.granted_scopes

    def narrow_queryset(self, queryset):
        return queryset

    def get_org_object(self):
        queryset = self.narrow_queryset(self.model.objects.for_organization(self.organization))
        return get_object_or_404(queryset, pk=self.kwargs["pk"])

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context.update(
            organization=self.organization, membership=self.membership, scopes=self.granted_scopes
        )
        return context
