"""Quotas per organization and resource class, created from the defaults on first use."""

from django.conf import settings

from jobs.models import Quota, ResourceClass
from tenants.models import Organization


def quota_get(*, organization: Organization, resource_class: ResourceClass) -> Quota:
    quota, _ = Quota.objects.get_or_create(
        organization=organization, resource_class=resource_class, defaults=settings.DEFAULT_QUOTA
    )
    return quota
