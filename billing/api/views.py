from django.http import HttpResponse, StreamingHttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import mixins
from rest_framework.decorators import action
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.response import Response

from billing import reports, selectors, services
from billing.models import CreditGrant, Invoice
from billing.pdf import invoice_pdf, invoice_pdf_filename
from tenants.api.base import OrganizationScopedAPIView, OrganizationScopedViewSet

from . import serializers as s


@extend_schema(tags=["billing"])
class BillingAccountView(OrganizationScopedAPIView):
    """The organization's plan, budget, spend this month and credits; PATCH sets the budget."""

    required_scopes = {"get": "billing:read", "patch": "billing:admin"}
    http_method_names = ["get", "patch", "head"]
    serializer_class = s.BillingAccountSerializer

    def _render(self):
        account = selectors.billing_account_get(organization=self.organization)
        summary = selectors.account_summary(account=account, at=timezone.now())
        return Response(s.BillingAccountSerializer(summary).data)

    def get(self, request, *args, **kwargs):
        return self._render()

    @extend_schema(request=s.BudgetSerializer, responses=s.BillingAccountSerializer)
    def patch(self, request, *args, **kwargs):
        account = selectors.billing_account_get(organization=self.organization)
        body = s.BudgetSerializer(data=request.data, partial=True)
        body.is_valid(raise_exception=True)
        fields = body.validated_data
        services.budget_set(
            organization=self.organization,
            actor=self.actor,
            monthly_budget_minor=fields.get("monthly_budget_minor", account.monthly_budget_minor),
            thresholds=fields.get("budget_thresholds", account.budget_thresholds),
            hard_cap=fields.get("budget_hard_cap", account.budget_hard_cap),
            billing_email=fields.get("billing_email"),
        )
        return self._render()


@extend_schema(tags=["billing"])
class CreditGrantViewSet(mixins.ListModelMixin, OrganizationScopedViewSet):
    """Credits granted to the organization and what is left of each."""

    model = CreditGrant
    serializer_class = s.CreditGrantSerializer
    required_scopes = {"list": "billing:read"}


class PdfRenderer(BaseRenderer):
    """Lets a client ask for `Accept: application/pdf`; errors still go out as JSON."""

    media_type = "application/pdf"
    format = "pdf"
    charset = None
    render_style = "binary"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if isinstance(data, bytes):
            return data
        response = (renderer_context or {}).get("response")
        if response is not None:
            response["Content-Type"] = JSONRenderer.media_type
        return JSONRenderer().render(data)


@extend_schema(tags=["billing"])
@extend_schema_view(
    retrieve=extend_schema(responses=s.InvoiceDetailSerializer),
    pdf=extend_schema(
        responses={(200, "application/pdf"): OpenApiTypes.BINARY},
        description="The invoice as a PDF file (an attachment named after its number).",
    ),
)
class InvoiceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, OrganizationScopedViewSet):
    """Invoices: issued by the built-in ledger each month, or mirrored from Stripe."""

    model = Invoice
    serializer_class = s.InvoiceSerializer
    required_scopes = {"list": "billing:read", "retrieve": "billing:read", "pdf": "billing:read"}

    def get_serializer_class(self):
        return s.InvoiceDetailSerializer if self.action == "retrieve" else s.InvoiceSerializer

    def narrow_queryset(self, queryset):
        if self.action == "retrieve":
            return queryset.prefetch_related("lines")
        return queryset

    @action(detail=True, methods=["get"], renderer_classes=[JSONRenderer, PdfRenderer])
    def pdf(self, request, *args, **kwargs):
        invoice = self.get_object()
        response = HttpResponse(invoice_pdf(invoice=invoice), content_type="application/pdf")
        response["Content-Disposition"] = (
            f'attachment; filename="{invoice_pdf_filename(invoice=invoice)}"'
        )
        return response


USAGE_PARAMETERS = [
    OpenApiParameter(
        "start", OpenApiTypes.DATE, description="First UTC day, inclusive (default: the 1st)"
    ),
    OpenApiParameter(
        "end", OpenApiTypes.DATE, description="Last UTC day, inclusive (default: today)"
    ),
    OpenApiParameter(
        "group_by", str, enum=list(reports.GROUPINGS), description="Default: resource"
    ),
    OpenApiParameter("label_key", str, description="The label to group by (group_by=label)"),
]


def _usage_report(view, request) -> reports.UsageReport:
    query = reports.usage_query(request.query_params, today=timezone.now().date())
    return reports.usage_report(organization=view.organization, **query.as_kwargs())


@extend_schema(tags=["billing"])
class UsageReportView(OrganizationScopedAPIView):
    """Cost from the ledger for a range of days, grouped, with a daily series by resource."""

    required_scopes = {"get": "billing:read"}
    http_method_names = ["get", "head"]
    serializer_class = s.UsageReportSerializer

    @extend_schema(parameters=USAGE_PARAMETERS, responses=s.UsageReportSerializer)
    def get(self, request, *args, **kwargs):
        return Response(s.usage_report_data(_usage_report(self, request)))


class CsvRenderer(BaseRenderer):
    """Lets a client ask for `Accept: text/csv`; errors still go out as JSON."""

    media_type = "text/csv"
    format = "csv"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        response = (renderer_context or {}).get("response")
        if response is not None:
            response["Content-Type"] = JSONRenderer.media_type
        return JSONRenderer().render(data)


@extend_schema(tags=["billing"])
class UsageExportView(OrganizationScopedAPIView):
    """The usage report as a CSV attachment: one line per group, then the total."""

    required_scopes = {"get": "billing:read"}
    http_method_names = ["get", "head"]
    renderer_classes = [JSONRenderer, CsvRenderer]

    @extend_schema(parameters=USAGE_PARAMETERS, responses={(200, "text/csv"): OpenApiTypes.STR})
    def get(self, request, *args, **kwargs):
        report = _usage_report(self, request)
        response = StreamingHttpResponse(
            reports.usage_csv_lines(report), content_type="text/csv; charset=utf-8"
        )
        filename = reports.usage_csv_filename(organization=self.organization, report=report)
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response


@extend_schema(tags=["billing"])
class CheckoutSessionView(OrganizationScopedAPIView):
    """A Stripe Checkout page (setup mode) where the organization saves a payment method.

    Without Stripe configured: 409 `stripe_not_configured` (invoices come from the built-in
    ledger).
    """

    required_scopes = {"post": "billing:admin"}
    http_method_names = ["post"]
    serializer_class = s.CheckoutSessionRequestSerializer

    @extend_schema(
        request=s.CheckoutSessionRequestSerializer, responses={200: s.StripeRedirectSerializer}
    )
    def post(self, request, *args, **kwargs):
        body = s.CheckoutSessionRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        url = services.checkout_session_create(
            organization=self.organization,
            success_url=body.validated_data.get("success_url"),
            cancel_url=body.validated_data.get("cancel_url"),
        )
        return Response({"url": url})


@extend_schema(tags=["billing"])
class PortalSessionView(OrganizationScopedAPIView):
    """A Stripe Billing Portal page: payment methods, invoices, billing details.

    Without Stripe configured: 409 `stripe_not_configured`.
    """

    required_scopes = {"post": "billing:admin"}
    http_method_names = ["post"]
    serializer_class = s.PortalSessionRequestSerializer

    @extend_schema(
        request=s.PortalSessionRequestSerializer, responses={200: s.StripeRedirectSerializer}
    )
    def post(self, request, *args, **kwargs):
        body = s.PortalSessionRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        url = services.portal_session_create(
            organization=self.organization, return_url=body.validated_data.get("return_url")
        )
        return Response({"url": url})
