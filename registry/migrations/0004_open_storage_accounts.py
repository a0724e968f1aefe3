from django.conf import settings
from django.db import migrations


def open_accounts(apps, schema_editor):
    """Organizations made before their storage account was opened at creation get one now, so
    reads never have to make it."""
    Organization = apps.get_model("tenants", "Organization")
    StorageAccount = apps.get_model("registry", "StorageAccount")
    missing = Organization.objects.exclude(
        pk__in=StorageAccount.objects.values("organization_id")
    ).values_list("pk", flat=True)
    StorageAccount.objects.bulk_create(
        [
            StorageAccount(organization_id=pk, quota_bytes=settings.STORAGE_QUOTA_DEFAULT_BYTES)
            for pk in missing.iterator()
        ],
        ignore_conflicts=True,
    )


class Migration(migrations.Migration):
    dependencies = [("registry", "0003_dataset_version_csv_dialect"), ("tenants", "0001_initial")]
    operations = [migrations.RunPython(open_accounts, migrations.RunPython.noop)]
