from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import generics, mixins
from rest_framework.response import Response

from billing import selectors, services
from billing.models import CreditGrant
from tenants.api.base import OrganizationScopedMixin, OrganizationScopedViewSet

from . import serializers as s


@extend_schema(tags=["billing"])
class BillingAccountView(OrganizationScopedMixin, generics.GenericAPIView):
    """The organization's plan, budget, spend this month and credits; PATCH sets the budget."""

    required_scopes = {"get": "billing:read", "patch": "billing:admin"}
    http_method_names = ["get", "patch", "head"]
    serializer_class = s.BillingAccountSerializer

    def _render(self):
        account = services.billing_account_get(organization=self.organization)
        summary = selectors.account_summary(account=account, at=timezone.now())
        return Response(s.BillingAccountSerializer(summary).data)

    def get(self, request, *args, **kwargs):
        return self._render()

    @extend_schema(request=s.BudgetSerializer, responses=s.BillingAccountSerializer)
    def patch(self, request, *args, **kwargs):
        account = services.billing_account_get(organization=self.organization)
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
