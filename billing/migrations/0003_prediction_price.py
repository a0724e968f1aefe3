from datetime import UTC, datetime
from decimal import Decimal

from django.db import migrations

LAUNCH = datetime(2026, 1, 1, tzinfo=UTC)


def create(apps, schema_editor):
    Price = apps.get_model("billing", "Price")
    Price.objects.get_or_create(
        resource="predictions",
        effective_from=LAUNCH,
        defaults={"unit": "1k_predictions", "unit_price": Decimal("0.05"), "currency": "usd"},
    )


class Migration(migrations.Migration):
    dependencies = [("billing", "0002_prices")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
