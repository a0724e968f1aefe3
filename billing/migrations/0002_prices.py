from datetime import UTC, datetime
from decimal import Decimal

from django.db import migrations

# Launch prices per GPU-second, in USD.
PRICES = {
    "gpu:cpu": "0.00002",
    "gpu:l4": "0.0002",
    "gpu:a100-40gb": "0.0008",
    "gpu:h100-80gb": "0.0012",
    "gpu:h200-141gb": "0.0016",
}
LAUNCH = datetime(2026, 1, 1, tzinfo=UTC)


def create(apps, schema_editor):
    Price = apps.get_model("billing", "Price")
    for resource, price in PRICES.items():
        Price.objects.get_or_create(
            resource=resource,
            effective_from=LAUNCH,
            defaults={"unit": "gpu_second", "unit_price": Decimal(price), "currency": "usd"},
        )


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
