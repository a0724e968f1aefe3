"""Quotas per organization and resource class, created from the defaults on first use."""

from django.conf import settings

from jobs.models import Quota, ResourceClass
from tenants.compiled import CompiledRows, row_fields, row_instance
from tenants.models import Organization


def quota_ensure(*, organization: Organization, resource_class: ResourceClass) -> Quota:
    """The quota, created from the defaults if the organization has none for the class yet (a
    write: called inside job submission's transaction, never from a read)."""
    quota, _ = Quota.objects.get_or_create(
        organization=organization, resource_class=resource_class, defaults=settings.DEFAULT_QUOTA
    )
    return quota


def _quota_locked(*, organization: int, resource_class: int):
    # Only the quota's own row: Quota's default ordering joins the organization and the resource
    # class, and FOR UPDATE without `of` locked their rows too, so every organization's submits
    # on a class waited on that class's one row (and any insert naming the organization).
    return (
        Quota.objects.for_organization(Organization(pk=organization))
        .select_for_update(of=("self",))
        .filter(resource_class=resource_class)
        .order_by()
        .values(*row_fields(Quota))
    )


# Every submit: compiled once per process (tenants.compiled).
_QUOTA_LOCKED = CompiledRows(_quota_locked, organization=int, resource_class=int)


def quota_locked(*, organization: Organization, resource_class: ResourceClass) -> Quota:
    """The quota as quota_ensure gives it, its row locked until the transaction ends: one query
    where it exists (every submit but an organization's first on the class), not a read and then
    a locking read."""
    rows = _QUOTA_LOCKED.rows(organization=organization.pk, resource_class=resource_class.pk)
    quota = row_instance(Quota, rows[0]) if rows else None
    if quota is None:
        quota = quota_ensure(organization=organization, resource_class=resource_class)
        quota = Quota.objects.select_for_update(of=("self",)).order_by().get(pk=quota.pk)
    return quota
