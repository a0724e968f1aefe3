from django.conf import settings
from django.db import migrations


def open_accounts(apps, schema_editor):
    """Organizations made before their billing account was opened at creation get what
    `billing_account_ensure` gives a new one: the default plan, its storage quota and its trial
    credit (audited). Their Stripe subscription follows from the push task's safety net."""
    Organization = apps.get_model("tenants", "Organization")
    AuditEvent = apps.get_model("tenants", "AuditEvent")
    Plan = apps.get_model("billing", "Plan")
    BillingAccount = apps.get_model("billing", "BillingAccount")
    CreditGrant = apps.get_model("billing", "CreditGrant")
    StorageAccount = apps.get_model("registry", "StorageAccount")
    missing = Organization.objects.exclude(pk__in=BillingAccount.objects.values("organization_id"))
    if not missing.exists():
        return
    plan = Plan.objects.filter(active=True).order_by("-is_default", "monthly_fee_minor").first()
    if plan is None:
        plan, _ = Plan.objects.get_or_create(code="payg", defaults={"name": "Pay as you go"})
    for organization in missing.iterator():
        account = BillingAccount.objects.create(organization=organization, plan=plan)
        StorageAccount.objects.update_or_create(
            organization=organization, defaults={"quota_bytes": plan.storage_quota_bytes}
        )
        if not plan.trial_credit_minor:
            continue
        reason = f"{plan.name} plan credit"
        grant, created = CreditGrant.objects.get_or_create(
            idempotency_key=f"plan-trial:{organization.pk}:{plan.code}",
            defaults={
                "organization": organization,
                "amount_minor": plan.trial_credit_minor,
                "remaining_minor": plan.trial_credit_minor,
                "currency": settings.BILLING_CURRENCY,
                "reason": reason,
            },
        )
        if created:
            AuditEvent.objects.create(
                organization=organization,
                actor_label="system",
                action="billing.credit_granted",
                target_type="billing.creditgrant",
                target_id=str(grant.pk),
                target_label=(
                    f"{organization.name}: {grant.amount_minor} {grant.currency} ({reason})"
                )[:255],
                data={"amount_minor": grant.amount_minor, "reason": reason},
            )


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0008_webhook_object_id_backfill"),
        ("registry", "0004_open_storage_accounts"),
        ("tenants", "0001_initial"),
    ]
    operations = [migrations.RunPython(open_accounts, migrations.RunPython.noop)]
