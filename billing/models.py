"""The price list and the usage ledger (the billing issue adds plans, budgets and invoices)."""

from django.conf import settings
from django.db import models
from django.utils import timezone

from tenants.models import OrganizationOwned


class Price(models.Model):
    """What one unit of a resource costs from `effective_from` on; past usage keeps its price."""

    resource = models.CharField(max_length=100, help_text='e.g. "gpu:a100-40gb"')
    unit = models.CharField(max_length=40, help_text='e.g. "gpu_second"')
    unit_price = models.DecimalField(max_digits=18, decimal_places=10)
    currency = models.CharField(max_length=3, default="usd")
    effective_from = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["resource", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["resource", "effective_from"], name="price_unique_start"
            ),
            models.CheckConstraint(condition=models.Q(unit_price__gte=0), name="price_nonneg"),
        ]

    def __str__(self):
        since = f"{self.effective_from:%Y-%m-%d}"
        return f"{self.resource}: {self.unit_price} {self.currency}/{self.unit} from {since}"


class UsageRecord(OrganizationOwned):
    """One append-only ledger row; its idempotency key makes a replayed write a no-op."""

    resource = models.CharField(max_length=100)
    quantity = models.DecimalField(max_digits=20, decimal_places=6)
    unit = models.CharField(max_length=40)
    unit_price = models.DecimalField(max_digits=18, decimal_places=10)
    amount_minor = models.BigIntegerField(help_text="In the currency's minor unit (cents).")
    currency = models.CharField(max_length=3)
    source_type = models.CharField(max_length=40, blank=True)
    source_id = models.CharField(max_length=64, blank=True)
    attempt = models.PositiveIntegerField(null=True, blank=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    labels = models.JSONField(default=dict, blank=True)
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    idempotency_key = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-period_end", "-pk"]
        indexes = [
            models.Index(fields=["organization", "-period_end"], name="usage_org_period"),
            models.Index(
                fields=["organization", "source_type", "source_id"], name="usage_org_source"
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(quantity__gte=0), name="usage_quantity_nonneg"
            ),
            models.CheckConstraint(
                condition=models.Q(period_end__gte=models.F("period_start")),
                name="usage_period_ordered",
            ),
        ]

    def __str__(self):
        return f"{self.organization_id} {self.quantity} {self.unit} of {self.resource}"
