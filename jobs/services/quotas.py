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


def quota_locked(*, organization: Organization, resource_class: ResourceClass) -> Quota:
    """The quota as quota_ensure gives it, its row locked until the transaction ends: one query
    where it exists (every submit but an organization's first on the class), not a read and then
    a locking read."""
    quota = (
        Quota.objects.select_for_update()
        .filter(organization=organization, resource_class=resource_class)
        .first()
    )
    if quota is None:
        quota = quota_ensure(organization=organization, resource_class=resource_class)
        quota = Quota.objects.select_for_update().get(pk=quota.pk)
    return quota
