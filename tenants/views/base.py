"""Org-scoped dashboard pages: login, then membership (else 404), then the method's scope, the
organization's standing and, for form posts, the API's rate limits, then the object the URL
names, found only through the organization's rows (else 404).

The seal of the API bases, for pages: a page cannot override `dispatch` or the methods that
build its rows; it narrows them through `narrow_queryset`, which may not drop the organization
filter (`tenants.seal`). A URL parameter besides the slug must name the page's object through
`lookup_fields`, so that no handler ever receives an id the base has not checked.
"""

from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import PermissionDenied
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, render

from tenants.actors import Actor
from tenants.api.throttles import throttle_wait
from tenants.errors import DomainError
from tenants.seal import SealBroken, organization_rows, refuse_unsealed
from tenants.selectors import organization_access
from tenants.standing import Effect, OrganizationRestricted, action_effect, standing_check


def throttled_page(request, wait: int) -> HttpResponse:
    """The page a form post gets when one of its rate-limit buckets is full."""
    response = render(request, "tenants/throttled.html", {"wait": wait}, status=429)
    response["Retry-After"] = str(wait)
    return response


class OrganizationPageMixin(LoginRequiredMixin):
    # The scope each HTTP method needs; a method not listed is not allowed (405).
    required_scopes: dict[str, str] = {}
    model = None  # the tenant-owned model of the page's object (or of its narrowed rows)
    # How the URL names the page's object: {model field: URL parameter}.
    lookup_fields: dict[str, str] = {"pk": "pk"}
    # Per method, where the scope alone would misjudge what a write does (tenants.standing).
    effects: dict[str, Effect] = {}
    # Per method, the stricter rate bucket of a costly operation (tenants.api.throttles).
    throttle_scopes: dict[str, str] = {}

    organization = None
    membership = None
    granted_scopes: frozenset[str] = frozenset()
    object = None

    _sealed = ("dispatch", "get_org_queryset", "get_org_object", "get_queryset", "get_object")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        refuse_unsealed(cls, OrganizationPageMixin)

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
        self.object = self._url_object(kwargs)
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
            return throttled_page(request, wait)
        return super().dispatch(request, *args, **kwargs)

    def _url_object(self, kwargs):
        named = set(kwargs) - {"org_slug"}
        if not named:
            return None
        if self.model is None or named != set(self.lookup_fields.values()):
            raise SealBroken(
                f"{type(self).__name__} takes {', '.join(sorted(named))} from the URL but "
                + ("names no model" if self.model is None else "does not look all of it up")
                + " to find it in; set `model` and `lookup_fields` ({model field: URL parameter})."
            )
        found = {field: kwargs[parameter] for field, parameter in self.lookup_fields.items()}
        return get_object_or_404(self.get_org_queryset(), **found)

    @property
    def actor(self) -> Actor:
        return Actor.from_request(self.request)

    def has_scope(self, scope: str) -> bool:
        return scope in self.granted_scopes

    def narrow_queryset(self, queryset):
        return queryset

    def get_org_queryset(self):
        if self.model is None:
            raise SealBroken(f"{type(self).__name__} names no model, so it has no rows to serve.")
        return organization_rows(
            model=self.model, organization=self.organization, narrow=self.narrow_queryset
        )

    def get_org_object(self):
        """The object the URL names, found by `dispatch` through the organization's rows."""
        if self.object is None:
            raise SealBroken(f"{type(self).__name__}'s URL names no object.")
        return self.object

    # Django's generic views (DetailView, ListView) reach their rows through these: the same seal.
    def get_queryset(self):
        return self.get_org_queryset()

    def get_object(self, queryset=None):
        return self.get_org_object()

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context.update(
            organization=self.organization, membership=self.membership, scopes=self.granted_scopes
        )
        return context


def form_add_domain_error(form, error: DomainError) -> None:
    """Show a service's refusal on the form: each field's messages beside the field (or above
    the form for a field it does not have), else the refusal's detail above it."""
    for field, errors in (error.fields or {}).items():
        for message in errors:
            form.add_error(field if field in form.fields else None, message)
    if not error.fields:
        form.add_error(None, error.detail)
