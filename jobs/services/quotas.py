"""Quotas per organization and resource class, created from the defaults on first use."""

from django.conf import settings

from jobs.models import Quota, ResourceClass
from tenants.models import Organization


def quota_ensure(*, organization: Organization, resource_class: ResourceClass) -> Quota:
    """The quota, created from the defaults if the organization has none for the class yet (a
    write: called inside job submission's transaction, never from a read)."""
    quota, _ = Quota.objects.get_or_create(
        organization=organization, resource_class=resource_class, defaults=settings.DEFAULT_QUOTA
    )
    return quota
