"""The budget banner every page of an organization shows once a budget threshold is crossed."""

from django.utils import timezone

from .selectors import budget_banner


def billing_banner(request):
    organization = getattr(request, "organization", None)
    if organization is None:
        return {}
    return {"budget_alert": budget_banner(organization=organization, at=timezone.now())}
