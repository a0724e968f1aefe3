"""The registry's part in what happens elsewhere: a new organization gets its storage account."""

from django.dispatch import receiver

from tenants.signals import organization_created

from .services.storage_accounts import storage_account_ensure


@receiver(organization_created, dispatch_uid="registry.storage_account_open")
def storage_account_open(*, organization, **_signal) -> None:
    storage_account_ensure(organization=organization)
