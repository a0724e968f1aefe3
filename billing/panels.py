"""The billing panel of an organization's overview page: this month's spend against the budget,
and what it was spent on."""

from django.utils import timezone

from tenants.models import Organization

from .reports import month_usage
from .selectors import account_summary, billing_account_get


def overview_panel(*, organization: Organization, scopes: frozenset[str]) -> dict | None:
    if "billing:read" not in scopes:
        return None
    account = billing_account_get(organization=organization)
    return {
        "template": "billing/_overview_panel.html",
        "summary": account_summary(account=account, at=timezone.now()),
        "month_usage": month_usage(organization=organization, today=timezone.now().date()),
    }
