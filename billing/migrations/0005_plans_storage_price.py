from datetime import UTC, datetime
from decimal import Decimal

from django.db import migrations

LAUNCH = datetime(2026, 1, 1, tzinfo=UTC)
GIB = 1024**3

# Launch plans; operators edit them in the admin. Amounts are in cents.
PLANS = [
    {
        "code": "trial",
        "name": "Trial",
        "description": "$50 of credits to try the platform on up to 2 GPUs at a time.",
        "trial_credit_minor": 5_000,
        "limit_gpus": 2,
        "max_running_jobs": 4,
        "storage_quota_bytes": 10 * GIB,
        "is_default": True,
    },
    {
        "code": "payg",
        "name": "Pay as you go",
        "description": "Pay for what you use, up to 8 GPUs at a time.",
        "limit_gpus": 8,
        "max_running_jobs": 10,
        "storage_quota_bytes": 100 * GIB,
    },
    {
        "code": "team",
        "name": "Team",
        "description": "$500 a month with $500 of usage included, 2 guaranteed GPUs, up to 32.",
        "monthly_fee_minor": 50_000,
        "included_credit_minor": 50_000,
        "guaranteed_gpus": 2,
        "limit_gpus": 32,
        "max_running_jobs": 50,
        "storage_quota_bytes": 1024 * GIB,
    },
]


def create(apps, schema_editor):
    Plan = apps.get_model("billing", "Plan")
    Price = apps.get_model("billing", "Price")
    for plan in PLANS:
        Plan.objects.get_or_create(code=plan["code"], defaults=plan)
    Price.objects.get_or_create(
        resource="storage",
        effective_from=LAUNCH,
        defaults={"unit": "gb_month", "unit_price": Decimal("0.023"), "currency": "usd"},
    )


class Migration(migrations.Migration):
    dependencies = [("billing", "0004_plans_budgets_invoices_stripe")]
    operations = [migrations.RunPython(create, migrations.RunPython.noop)]
