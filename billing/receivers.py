"""Billing's part in what happens elsewhere: a new organization gets its billing account."""

from django.dispatch import receiver

from tenants.signals import organization_created

from .services import billing_account_ensure


@receiver(organization_created, dispatch_uid="billing.account_open")
def billing_account_open(*, organization, **_signal) -> None:
    billing_account_ensure(organization=organization)
