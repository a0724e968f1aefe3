"""Dashboard pages for webhooks: endpoints (create, change, rotate, test, delete) and the
delivery log with each try's answer and a resend button."""

import json

from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import redirect
from django.views import View
from django.views.generic import TemplateView

from tenants.errors import DomainError
from tenants.standing import Effect
from tenants.views.base import OrganizationPageMixin, form_add_domain_error

from . import selectors, services
from .forms import EndpointForm, EndpointUpdateForm
from .models import WebhookDelivery, WebhookEndpoint


class EndpointsPage(OrganizationPageMixin, TemplateView):
    template_name = "webhooks/endpoints.html"
    required_scopes = {"get": "webhooks:read", "post": "webhooks:admin"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        context["endpoints"] = selectors.endpoint_list(organization=self.organization)
        context.setdefault("form", EndpointForm())
        return context

    def post(self, request, org_slug):
        form = EndpointForm(request.POST)
        if form.is_valid():
            try:
                endpoint, secret = services.endpoint_create(
                    organization=self.organization, actor=self.actor, **form.cleaned_data
                )
            except DomainError as error:
                form_add_domain_error(form, error)
            else:
                # The secret is shown in this response only (derived again on request: rotate).
                context = self.get_context_data(form=EndpointForm(), new=endpoint, secret=secret)
                return self.render_to_response(context, status=201)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class EndpointPage(OrganizationPageMixin, TemplateView):
    """One endpoint: its settings form and its delivery log."""

    template_name = "webhooks/endpoint.html"
    model = WebhookEndpoint
    required_scopes = {"get": "webhooks:read", "post": "webhooks:admin"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        endpoint = self.get_org_object()
        context["endpoint"] = endpoint
        state = self.request.GET.get("state")
        deliveries = selectors.delivery_list(
            organization=self.organization,
            endpoint=endpoint,
            state=state if state in WebhookDelivery.State.values else None,
        )
        context["page"] = Paginator(deliveries, 50).get_page(self.request.GET.get("page"))
        context["states"] = WebhookDelivery.State.choices
        context.setdefault(
            "form",
            EndpointUpdateForm(
                initial={
                    "url": endpoint.url,
                    "description": endpoint.description,
                    "event_types": endpoint.event_types,
                    "enabled": endpoint.enabled,
                }
            ),
        )
        return context

    def post(self, request, org_slug, pk):
        form = EndpointUpdateForm(request.POST)
        if form.is_valid():
            try:
                services.endpoint_update(
                    endpoint=self.get_org_object(), actor=self.actor, **form.cleaned_data
                )
            except DomainError as error:
                form_add_domain_error(form, error)
            else:
                messages.success(request, "Endpoint saved.")
                return redirect("webhooks:endpoint", org_slug, pk)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class EndpointRotatePage(EndpointPage):
    """A new secret, shown on the endpoint's page in this response only."""

    required_scopes = {"post": "webhooks:admin"}

    def post(self, request, org_slug, pk):
        secret = services.endpoint_secret_rotate(endpoint=self.get_org_object(), actor=self.actor)
        return self.render_to_response(self.get_context_data(secret=secret))


class _ObjectAction(OrganizationPageMixin, View):
    """A POST-only action on one object of the organization, then back to a page."""

    def post(self, request, org_slug, pk):
        target = self.get_org_object()
        try:
            message, back = self.perform(target)
        except DomainError as error:
            messages.error(request, error.detail)
            back = self.back(target)
        else:
            messages.success(request, message)
        return redirect(*back)

    def perform(self, target) -> tuple[str, tuple]:
        raise NotImplementedError

    def back(self, target) -> tuple:
        raise NotImplementedError


class EndpointTestAction(_ObjectAction):
    model = WebhookEndpoint
    required_scopes = {"post": "webhooks:admin"}

    def back(self, target):
        return ("webhooks:endpoint", self.organization.slug, target.pk)

    def perform(self, target):
        services.endpoint_test_send(endpoint=target, actor=self.actor)
        return "A test event is on its way; it appears in the log below.", self.back(target)


class EndpointDeleteAction(_ObjectAction):
    model = WebhookEndpoint
    required_scopes = {"post": "webhooks:admin"}
    effects = {"post": Effect.REDUCE}

    def back(self, target):
        return ("webhooks:endpoint", self.organization.slug, target.pk)

    def perform(self, target):
        services.endpoint_delete(endpoint=target, actor=self.actor)
        return f"Endpoint {target.url} deleted.", ("webhooks:endpoints", self.organization.slug)


class DeliveryPage(OrganizationPageMixin, TemplateView):
    """One delivery: the payload sent and every try with the receiver's answer."""

    template_name = "webhooks/delivery.html"
    model = WebhookDelivery
    required_scopes = {"get": "webhooks:read"}

    def narrow_queryset(self, queryset):
        return queryset.select_related("event", "endpoint")

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        delivery = self.get_org_object()
        context["delivery"] = delivery
        context["payload"] = json.dumps(delivery.event.payload, indent=2, sort_keys=True)
        context["tries"] = selectors.attempt_list(organization=self.organization, delivery=delivery)
        return context


class DeliveryResendAction(_ObjectAction):
    model = WebhookDelivery
    required_scopes = {"post": "webhooks:admin"}

    def back(self, target):
        return ("webhooks:delivery", self.organization.slug, target.pk)

    def perform(self, target):
        services.delivery_resend(delivery=target, actor=self.actor)
        return "Sent again, with the same webhook-id.", self.back(target)
