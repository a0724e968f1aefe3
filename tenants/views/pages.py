"""Dashboard pages for organizations, members, invitations, API keys and the audit log."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin
from django.contrib.auth.views import redirect_to_login
from django.core.paginator import Paginator
from django.shortcuts import redirect, render
from django.utils.module_loading import import_string
from django.views import View
from django.views.generic import TemplateView

from tenants import selectors, services
from tenants.actors import Actor
from tenants.api.throttles import throttle_wait
from tenants.errors import DomainError
from tenants.forms import (
    ApiKeyForm,
    AuditFilterForm,
    InvitationAcceptForm,
    InvitationForm,
    OrganizationForm,
    RoleForm,
)
from tenants.models import ApiKey, Invitation, Membership
from tenants.scopes import Role, roles_within
from tenants.standing import Effect

from .base import OrganizationPageMixin, form_add_domain_error, throttled_page


class OrganizationCreatePage(LoginRequiredMixin, View):
    template_name = "tenants/organization_create.html"
    # Each organization costs money at once (trial credit, storage, a Stripe customer): the
    # person's daily bucket, shared with the API's create.
    throttle_scopes = {"post": "org_create"}

    def get(self, request):
        return render(request, self.template_name, {"form": OrganizationForm()})

    def post(self, request):
        if (wait := throttle_wait(request, self)) is not None:
            return throttled_page(request, wait)
        form = OrganizationForm(request.POST)
        if form.is_valid():
            try:
                organization = services.organization_create(
                    name=form.cleaned_data["name"],
                    owner=request.user,
                    actor=Actor.from_request(request),
                )
            except DomainError as error:
                form_add_domain_error(form, error)
            else:
                messages.success(request, f"{organization.name} is ready.")
                return redirect("tenants:overview", organization.slug)
        return render(request, self.template_name, {"form": form}, status=400)


class ProfilePage(LoginRequiredMixin, TemplateView):
    template_name = "tenants/profile.html"

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context["memberships"] = self.request.user.memberships.select_related("organization")
        return context


class InvitationAcceptPage(View):
    """The link in an invitation e-mail. Its token is in the URL fragment, which the browser never
    sends; the page's script copies it into the form, which posts it in the body.

    Anyone may open the page, so the script can keep the token (in the tab's sessionStorage)
    while its reader signs in; accepting needs a signed-in user.
    """

    template_name = "tenants/invitation_accept.html"

    def get(self, request):
        return render(request, self.template_name, {"form": InvitationAcceptForm()})

    def post(self, request):
        if not request.user.is_authenticated:
            return redirect_to_login(request.path)
        form = InvitationAcceptForm(request.POST)
        status = 400
        if form.is_valid():
            try:
                membership = services.invitation_accept(
                    token=form.cleaned_data["token"],
                    user=request.user,
                    actor=Actor.from_request(request),
                )
            except DomainError as error:
                form_add_domain_error(form, error)
                status = error.status
            else:
                messages.success(request, f"Welcome to {membership.organization.name}.")
                return redirect("tenants:overview", membership.organization.slug)
        return render(request, self.template_name, {"form": form}, status=status)


class OverviewPage(OrganizationPageMixin, TemplateView):
    template_name = "tenants/overview.html"
    required_scopes = {"get": "org:read"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context["member_count"] = selectors.member_list(organization=self.organization).count()
        # Panels other apps contribute (jobs, billing), named in settings: tenants imports no app.
        context["panels"] = [
            panel
            for path in settings.ORGANIZATION_OVERVIEW_PANELS
            if (
                panel := import_string(path)(
                    organization=self.organization, scopes=self.granted_scopes
                )
            )
        ]
        if self.has_scope("audit:read"):
            context["recent_events"] = selectors.audit_event_list(organization=self.organization)[
                :10
            ]
        return context


class SettingsPage(OrganizationPageMixin, TemplateView):
    template_name = "tenants/settings.html"
    required_scopes = {"get": "org:read", "post": "org:admin"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context.setdefault("form", OrganizationForm(initial={"name": self.organization.name}))
        return context

    def post(self, request, org_slug):
        form = OrganizationForm(request.POST)
        if form.is_valid():
            try:
                services.organization_update(
                    organization=self.organization, name=form.cleaned_data["name"], actor=self.actor
                )
            except DomainError as error:
                form_add_domain_error(form, error)
            else:
                messages.success(request, "Saved.")
                return redirect("tenants:settings", org_slug)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class MembersPage(OrganizationPageMixin, TemplateView):
    """Members and pending invitations; posting invites someone."""

    template_name = "tenants/members.html"
    required_scopes = {"get": "members:read", "post": "members:admin"}
    throttle_scopes = {"post": "invite"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context["members"] = selectors.member_list(organization=self.organization)
        context["invitations"] = [
            invitation
            for invitation in selectors.invitation_list(organization=self.organization)[:200]
            if invitation.status == Invitation.Status.PENDING
        ]
        within = roles_within(self.granted_scopes)
        context["roles"] = [(value, label) for value, label in Role.choices if value in within]
        context.setdefault("form", InvitationForm(granted_scopes=self.granted_scopes))
        return context

    def post(self, request, org_slug):
        form = InvitationForm(request.POST, granted_scopes=self.granted_scopes)
        if form.is_valid():
            try:
                invitation = services.invitation_create(
                    organization=self.organization, actor=self.actor, **form.cleaned_data
                )
            except DomainError as error:
                form_add_domain_error(form, error)
            else:
                messages.success(request, f"Invitation sent to {invitation.email}.")
                return redirect("tenants:members", org_slug)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class _ObjectActionPage(OrganizationPageMixin, View):
    """A POST-only action on one object of the organization, then back to a list page."""

    success_url_name = ""

    def post(self, request, org_slug, pk):
        target = self.get_org_object()
        try:
            message = self.perform(target)
        except DomainError as error:
            messages.error(request, error.detail)
        else:
            messages.success(request, message)
        return redirect(self.success_url_name, org_slug)

    def perform(self, target) -> str:
        raise NotImplementedError


class MemberRoleAction(_ObjectActionPage):
    model = Membership
    required_scopes = {"post": "members:owner"}
    success_url_name = "tenants:members"

    def perform(self, target):
        form = RoleForm(self.request.POST)
        if not form.is_valid():
            raise DomainError("Choose one of the listed roles.")
        membership = services.membership_change_role(
            membership=target, role=form.cleaned_data["role"], actor=self.actor
        )
        return f"{membership.user.email} is now {membership.get_role_display().lower()}."


class MemberRemoveAction(_ObjectActionPage):
    model = Membership
    required_scopes = {"post": "members:owner"}
    effects = {"post": Effect.REDUCE}
    success_url_name = "tenants:members"

    def perform(self, target):
        services.membership_remove(membership=target, actor=self.actor)
        return f"{target.user.email} was removed."


class InvitationRevokeAction(_ObjectActionPage):
    model = Invitation
    required_scopes = {"post": "members:admin"}
    effects = {"post": Effect.REDUCE}
    success_url_name = "tenants:members"

    def perform(self, target):
        services.invitation_revoke(invitation=target, actor=self.actor)
        return f"The invitation to {target.email} was revoked."


class _OwnKeysUnlessAdmin:
    def narrow_queryset(self, queryset):
        if not self.has_scope("keys:admin"):
            queryset = queryset.filter(created_by=self.request.user)
        return queryset.select_related("created_by")


class ApiKeysPage(_OwnKeysUnlessAdmin, OrganizationPageMixin, TemplateView):
    template_name = "tenants/api_keys.html"
    required_scopes = {"get": "keys:write", "post": "keys:write"}
    model = ApiKey

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        keys = self.get_org_queryset()
        context["page"] = Paginator(keys, 50).get_page(self.request.GET.get("page"))
        context.setdefault("form", ApiKeyForm(granted_scopes=self.granted_scopes))
        return context

    def post(self, request, org_slug):
        form = ApiKeyForm(request.POST, granted_scopes=self.granted_scopes)
        if form.is_valid():
            try:
                api_key, token = services.api_key_create(
                    organization=self.organization, actor=self.actor, **form.cleaned_data
                )
            except DomainError as error:
                form_add_domain_error(form, error)
            else:
                # The token exists only in this response: it is never stored or shown again.
                context = self.get_context_data(
                    form=ApiKeyForm(granted_scopes=self.granted_scopes),
                    new_key=api_key,
                    token=token,
                )
                return self.render_to_response(context, status=201)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class ApiKeyRevokeAction(_OwnKeysUnlessAdmin, _ObjectActionPage):
    model = ApiKey
    required_scopes = {"post": "keys:write"}
    effects = {"post": Effect.REDUCE}
    success_url_name = "tenants:api_keys"

    def perform(self, target):
        services.api_key_revoke(api_key=target, actor=self.actor)
        return f"Key {target.name} ({target.prefix}) was revoked; it stops working now."


class AuditPage(OrganizationPageMixin, TemplateView):
    template_name = "tenants/audit.html"
    required_scopes = {"get": "audit:read"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        form = AuditFilterForm(self.request.GET or None)
        filters = form.cleaned_data if form.is_valid() else {}
        events = selectors.audit_event_list(
            organization=self.organization, **{k: v for k, v in filters.items() if v}
        )
        context["form"] = form
        context["page"] = Paginator(events, 50).get_page(self.request.GET.get("page"))
        query = self.request.GET.copy()
        query.pop("page", None)
        context["query"] = query.urlencode()
        return context
