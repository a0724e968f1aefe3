"""Dashboard pages of billing (the account: plan, budget, credits, invoices, payment), and the
endpoint Stripe posts its webhook events to."""

import json
from decimal import Decimal

import stripe
from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from django.views.generic import TemplateView, View

from tenants.errors import DomainError
from tenants.views.base import OrganizationPageMixin

from . import charts, invoicing, reports, selectors, services, stripe_events
from .errors import BillingError
from .forms import BudgetForm
from .models import CreditGrant, Invoice
from .pdf import invoice_pdf, invoice_pdf_filename
from .selectors import minor_per_unit

USAGE_ROWS_SHOWN = 100


class BillingPage(OrganizationPageMixin, TemplateView):
    template_name = "billing/billing.html"
    required_scopes = {"get": "billing:read", "post": "billing:admin"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        account = selectors.billing_account_get(organization=self.organization)
        budget = account.monthly_budget_minor
        context.setdefault(
            "form",
            BudgetForm(
                initial={
                    "monthly_budget": (
                        Decimal(budget) / minor_per_unit(settings.BILLING_CURRENCY)
                        if budget is not None
                        else None
                    ),
                    "budget_thresholds": ", ".join(map(str, account.budget_thresholds)),
                    "budget_hard_cap": account.budget_hard_cap,
                    "billing_email": account.billing_email,
                }
            ),
        )
        context.update(
            summary=selectors.account_summary(account=account, at=timezone.now()),
            month_usage=reports.month_usage(
                organization=self.organization, today=timezone.now().date()
            ),
            credits=CreditGrant.objects.for_organization(self.organization)[:20],
            can_admin=self.has_scope("billing:admin"),
            stripe_enabled=selectors.stripe_enabled(),
            invoices=invoicing.invoice_list(organization=self.organization)[:24],
        )
        return context

    def post(self, request, org_slug):
        form = BudgetForm(request.POST)
        if form.is_valid():
            amount = form.cleaned_data["monthly_budget"]
            try:
                services.budget_set(
                    organization=self.organization,
                    actor=self.actor,
                    monthly_budget_minor=(
                        int(amount * minor_per_unit(settings.BILLING_CURRENCY))
                        if amount is not None
                        else None
                    ),
                    thresholds=form.cleaned_data["budget_thresholds"],
                    hard_cap=form.cleaned_data["budget_hard_cap"],
                    billing_email=form.cleaned_data["billing_email"],
                )
            except DomainError as error:
                form.add_error(None, error.detail)
            else:
                messages.success(request, "Budget saved.")
                return redirect("billing:billing", org_slug)
        return self.render_to_response(self.get_context_data(form=form), status=400)


class InvoicePage(OrganizationPageMixin, TemplateView):
    """One invoice, laid out to print: lines, credits, tax and total."""

    template_name = "billing/invoice.html"
    required_scopes = {"get": "billing:read"}
    model = Invoice

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        invoice = self.get_org_object()
        context.update(invoice=invoice, statement=invoicing.invoice_statement(invoice=invoice))
        return context


class InvoicePdfDownload(OrganizationPageMixin, View):
    required_scopes = {"get": "billing:read"}
    model = Invoice

    def get(self, request, org_slug, pk):
        invoice = self.get_org_object()
        response = HttpResponse(invoice_pdf(invoice=invoice), content_type="application/pdf")
        filename = invoice_pdf_filename(invoice=invoice)
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response


class UsagePage(OrganizationPageMixin, TemplateView):
    """Cost by resource, day, user, API key, label, model or job, with a stacked daily chart."""

    template_name = "billing/usage.html"
    required_scopes = {"get": "billing:read"}

    def get(self, request, *args, **kwargs):
        try:
            query = reports.usage_query(request.GET, today=timezone.now().date())
            report = reports.usage_report(organization=self.organization, **query.as_kwargs())
        except BillingError as error:
            context = self.get_context_data(error=error.detail, errors=error.fields or {})
            return self.render_to_response(context, status=400)
        chart = charts.stacked_daily_chart(
            daily=report.daily, resources=report.resources, currency=report.currency
        )
        # The largest groups only: a month by job is thousands of rows, a second to render. A
        # year of days is shown whole; the CSV has every row.
        shown = reports.MAX_RANGE_DAYS if report.group_by == "day" else USAGE_ROWS_SHOWN
        rows = report.rows[:shown]
        context = self.get_context_data(
            report=report, chart=chart, rows=rows, rows_hidden=len(report.rows) - len(rows)
        )
        return self.render_to_response(context)

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        start, end = reports.usage_defaults(today=timezone.now().date())
        params = self.request.GET
        context.update(
            groupings=reports.GROUPINGS,
            values={
                "start": params.get("start") or start.isoformat(),
                "end": params.get("end") or end.isoformat(),
                "group_by": params.get("group_by") or "resource",
                "label_key": params.get("label_key") or "",
            },
            query=params.urlencode(),
        )
        return context


class UsageCsvDownload(OrganizationPageMixin, View):
    required_scopes = {"get": "billing:read"}

    def get(self, request, org_slug):
        try:
            query = reports.usage_query(request.GET, today=timezone.now().date())
            report = reports.usage_report(organization=self.organization, **query.as_kwargs())
        except BillingError:
            # The report page explains what is wrong beside each field.
            return redirect(
                f"{reverse('billing:usage', args=[org_slug])}?{request.GET.urlencode()}"
            )
        response = StreamingHttpResponse(
            reports.usage_csv_lines(report), content_type="text/csv; charset=utf-8"
        )
        filename = reports.usage_csv_filename(organization=self.organization, report=report)
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response


class _StripeRedirectPage(OrganizationPageMixin, View):
    """POST: send the browser to a Stripe-hosted page that returns it to the billing page;
    errors come back as a message."""

    required_scopes = {"post": "billing:admin"}

    def stripe_url(self) -> str:
        raise NotImplementedError

    def post(self, request, org_slug):
        try:
            url = self.stripe_url()
        except DomainError as error:
            messages.error(request, error.detail)
            return redirect("billing:billing", org_slug)
        return redirect(url)


class CheckoutPage(_StripeRedirectPage):
    def stripe_url(self):
        back = services.billing_page_address(self.organization)
        return services.checkout_session_create(
            organization=self.organization, success_url=f"{back}?payment=saved"
        )


class PortalPage(_StripeRedirectPage):
    def stripe_url(self):
        return services.portal_session_create(organization=self.organization)


def _webhook_error(status: int, code: str, detail: str) -> JsonResponse:
    return JsonResponse({"code": code, "detail": detail}, status=status)


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> JsonResponse:
    """Stripe's events: signature and timestamp checked (else 400), then stored and applied once
    (`stripe_events.event_receive`); any verified event is answered 200, a repeat included."""
    if not settings.STRIPE_WEBHOOK_SECRET:
        return _webhook_error(
            400, "stripe_not_configured", "Stripe webhooks are not configured here."
        )
    try:
        stripe.Webhook.construct_event(
            request.body, request.headers.get("Stripe-Signature"), settings.STRIPE_WEBHOOK_SECRET
        )
    except stripe.SignatureVerificationError:
        return _webhook_error(400, "bad_signature", "The Stripe-Signature header does not verify.")
    except (ValueError, TypeError, AttributeError, KeyError):
        # Signed, but not JSON or not an object (the library trips on a JSON list).
        return _webhook_error(400, "bad_payload", "The body is not a Stripe event.")
    payload = json.loads(request.body)
    if not isinstance(payload, dict) or not payload.get("id") or "created" not in payload:
        return _webhook_error(400, "bad_payload", "The body is not a Stripe event.")
    stored, duplicate = stripe_events.event_receive(payload=payload)
    return JsonResponse(
        {"received": stored.event_id, "duplicate": duplicate, "error": stored.error}, status=200
    )
