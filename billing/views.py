"""Dashboard pages of billing: the account (plan, budget, credits, invoices, payment)."""

from decimal import Decimal

from django.contrib import messages
from django.shortcuts import redirect
from django.utils import timezone
from django.views.generic import TemplateView

from tenants.errors import DomainError
from tenants.views.base import OrganizationPageMixin

from . import selectors, services
from .forms import BudgetForm
from .models import CreditGrant


class BillingPage(OrganizationPageMixin, TemplateView):
    template_name = "billing/billing.html"
    required_scopes = {"get": "billing:read", "post": "billing:admin"}

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        account = services.billing_account_get(organization=self.organization)
        budget = account.monthly_budget_minor
        context.setdefault(
            "form",
            BudgetForm(
                initial={
                    "monthly_budget": Decimal(budget) / 100 if budget is not None else None,
                    "budget_thresholds": ", ".join(map(str, account.budget_thresholds)),
                    "budget_hard_cap": account.budget_hard_cap,
                    "billing_email": account.billing_email,
                }
            ),
        )
        context.update(
            summary=selectors.account_summary(account=account, at=timezone.now()),
            credits=CreditGrant.objects.for_organization(self.organization)[:20],
            can_admin=self.has_scope("billing:admin"),
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
                    monthly_budget_minor=int(amount * 100) if amount is not None else None,
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
