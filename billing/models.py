"""Billing: rate card, plans, the usage ledger, budgets, credits, invoices and the Stripe mirror."""

from django.conf import settings
from django.db import models
from django.utils import timezone

from tenants.models import OrganizationOwned

MAX_QUANTITY = 10**12
MAX_AMOUNT_MINOR = 10**13  # a hundred billion dollars in one row is a bug, not usage


def _nonneg(field: str, name: str) -> models.CheckConstraint:
    return models.CheckConstraint(condition=models.Q(**{f"{field}__gte": 0}), name=name)


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
    model_name = models.CharField(
        max_length=100, blank=True, help_text="The registered model this usage trained or served."
    )
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    idempotency_key = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-period_end", "-pk"]
        indexes = [
            # The usage summary reads an organization's month from the index alone (no row
            # visits): 1.7 -> 0.5 ms for a month of about 340 rows (docs/benchmarks.md).
            models.Index(
                fields=["organization", "-period_end"],
                include=["resource", "currency", "unit", "amount_minor", "quantity"],
                name="usage_org_period_cover",
            ),
            models.Index(
                fields=["organization", "source_type", "source_id"], name="usage_org_source"
            ),
            # Operators' views read a month across all organizations.
            models.Index(fields=["period_end"], name="usage_period_end"),
            models.Index(fields=["created_at"], name="usage_created_at"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(quantity__gte=0), name="usage_quantity_nonneg"
            ),
            # A trillion units is over 30,000 GPU-years in seconds: anything above is a bug.
            models.CheckConstraint(
                condition=models.Q(quantity__lte=MAX_QUANTITY), name="usage_quantity_sane"
            ),
            models.CheckConstraint(
                condition=models.Q(amount_minor__gte=0, amount_minor__lte=MAX_AMOUNT_MINOR),
                name="usage_amount_sane",
            ),
            models.CheckConstraint(
                condition=models.Q(unit_price__gte=0), name="usage_unit_price_nonneg"
            ),
            models.CheckConstraint(
                condition=models.Q(period_end__gte=models.F("period_start")),
                name="usage_period_ordered",
            ),
        ]

    def __str__(self):
        return f"{self.organization_id} {self.quantity} {self.unit} of {self.resource}"


class UsageTally(OrganizationOwned):
    """A month's running total per resource: exact (sub-cent) and billed (whole cents).

    Each ledger row's amount is the rounded running total minus what the month billed before, so
    sub-cent costs (an hour of a gigabyte, one prediction) add up instead of rounding to nothing,
    and a month's rows sum to its exact cost rounded once.
    """

    resource = models.CharField(max_length=100)
    currency = models.CharField(max_length=3)
    month = models.DateField(help_text="First day of the month.")
    exact_minor = models.DecimalField(max_digits=30, decimal_places=10, default=0)
    billed_minor = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "resource", "currency", "month"], name="usage_tally_once"
            ),
            _nonneg("billed_minor", "usage_tally_billed_nonneg"),
        ]

    def __str__(self):
        return f"{self.organization_id} {self.month:%Y-%m} {self.resource}: {self.billed_minor}"


def default_budget_thresholds() -> list[int]:
    return [50, 80, 100]


class Plan(models.Model):
    """What an organization signs up for: default quotas, storage quota, fees and credits."""

    code = models.SlugField(max_length=40, unique=True)
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    monthly_fee_minor = models.BigIntegerField(default=0)
    included_credit_minor = models.BigIntegerField(
        default=0, help_text="Credits granted at the start of every month."
    )
    trial_credit_minor = models.BigIntegerField(
        default=0, help_text="Credits granted once, when an organization joins the plan."
    )
    guaranteed_gpus = models.PositiveIntegerField(default=0)
    limit_gpus = models.PositiveIntegerField(default=8)
    max_running_jobs = models.PositiveIntegerField(default=10)
    storage_quota_bytes = models.BigIntegerField(default=50 * 1024**3)
    is_default = models.BooleanField(default=False, help_text="Given to new organizations.")
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["monthly_fee_minor", "code"]
        constraints = [
            _nonneg("monthly_fee_minor", "plan_fee_nonneg"),
            _nonneg("included_credit_minor", "plan_included_credit_nonneg"),
            _nonneg("trial_credit_minor", "plan_trial_credit_nonneg"),
            _nonneg("storage_quota_bytes", "plan_storage_quota_nonneg"),
            models.UniqueConstraint(
                fields=["is_default"],
                condition=models.Q(is_default=True),
                name="plan_one_default",
            ),
        ]

    def __str__(self):
        return self.name


class BillingAccount(OrganizationOwned):
    """One per organization: its plan, budget, Stripe customer and payment standing."""

    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="accounts")
    billing_email = models.EmailField(blank=True)
    tax_rate_percent = models.DecimalField(
        max_digits=5, decimal_places=2, default=0, help_text="Applied by built-in invoices."
    )
    monthly_budget_minor = models.BigIntegerField(
        null=True, blank=True, help_text="Spend per calendar month that raises alerts."
    )
    budget_thresholds = models.JSONField(
        default=default_budget_thresholds,
        blank=True,
        help_text="Percentages of the budget that alert, e.g. [50, 80].",
    )
    budget_hard_cap = models.BooleanField(
        default=False, help_text="Stop placing new jobs once the budget is reached."
    )
    stripe_customer_id = models.CharField(max_length=100, blank=True)
    stripe_subscription_id = models.CharField(max_length=100, blank=True)
    past_due_since = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization"], name="billing_account_one_per_org"),
            models.UniqueConstraint(
                fields=["stripe_customer_id"],
                condition=~models.Q(stripe_customer_id=""),
                name="billing_account_unique_customer",
            ),
            _nonneg("monthly_budget_minor", "billing_budget_nonneg"),
            models.CheckConstraint(
                condition=models.Q(tax_rate_percent__gte=0, tax_rate_percent__lte=100),
                name="billing_tax_rate_percent",
            ),
        ]

    def __str__(self):
        return f"{self.organization} on {self.plan}"


class BudgetAlert(OrganizationOwned):
    """A budget threshold crossed in a month; the unique key sends each alert once."""

    month = models.DateField(help_text="First day of the month.")
    threshold = models.PositiveSmallIntegerField()
    budget_minor = models.BigIntegerField()
    spend_minor = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-month", "-threshold"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "month", "threshold"], name="budget_alert_once"
            ),
        ]

    def __str__(self):
        return f"{self.organization}: {self.threshold}% of budget in {self.month:%Y-%m}"


class CreditGrant(OrganizationOwned):
    """Money an operator or a plan gives; consumed, oldest expiry first, before invoicing."""

    amount_minor = models.BigIntegerField()
    remaining_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3, default="usd")
    reason = models.CharField(max_length=200)
    granted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    idempotency_key = models.CharField(max_length=200, unique=True)
    stripe_transaction_id = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-pk"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(amount_minor__gt=0, amount_minor__lte=MAX_AMOUNT_MINOR),
                name="credit_amount_positive",
            ),
            models.CheckConstraint(
                condition=models.Q(remaining_minor__gte=0)
                & models.Q(remaining_minor__lte=models.F("amount_minor")),
                name="credit_remaining_within_amount",
            ),
        ]

    def __str__(self):
        return f"{self.organization}: {self.amount_minor} {self.currency} ({self.reason})"


class Invoice(OrganizationOwned):
    """An invoice issued by the built-in ledger, or mirrored from Stripe by webhooks."""

    class Source(models.TextChoices):
        BUILTIN = "builtin", "Built-in"
        STRIPE = "stripe", "Stripe"

    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        OPEN = "open", "Open"
        PAID = "paid", "Paid"
        VOID = "void", "Void"
        UNCOLLECTIBLE = "uncollectible", "Uncollectible"

    number = models.CharField(max_length=100, blank=True)
    source = models.CharField(max_length=10, choices=Source.choices)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT)
    stripe_id = models.CharField(max_length=100, blank=True)
    currency = models.CharField(max_length=3, default="usd")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    subtotal_minor = models.BigIntegerField(default=0)
    credits_minor = models.BigIntegerField(default=0)
    tax_minor = models.BigIntegerField(default=0)
    total_minor = models.BigIntegerField(default=0)
    hosted_url = models.URLField(max_length=500, blank=True)
    pdf_url = models.URLField(max_length=500, blank=True)
    issued_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)
    stripe_updated = models.DateTimeField(
        null=True, blank=True, help_text="Creation time of the newest Stripe event applied."
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-period_start", "-pk"]
        indexes = [models.Index(fields=["organization", "-period_start"], name="invoice_org")]
        constraints = [
            models.UniqueConstraint(
                fields=["stripe_id"], condition=~models.Q(stripe_id=""), name="invoice_stripe_once"
            ),
            models.UniqueConstraint(
                fields=["number"], condition=~models.Q(number=""), name="invoice_number_unique"
            ),
            models.UniqueConstraint(
                fields=["organization", "period_start"],
                condition=models.Q(source="builtin"),
                name="invoice_builtin_once_per_period",
            ),
            _nonneg("subtotal_minor", "invoice_subtotal_nonneg"),
            _nonneg("credits_minor", "invoice_credits_nonneg"),
            _nonneg("tax_minor", "invoice_tax_nonneg"),
            _nonneg("total_minor", "invoice_total_nonneg"),
        ]

    def __str__(self):
        return self.number or self.stripe_id or f"invoice {self.pk}"


class InvoiceLine(models.Model):
    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    description = models.CharField(max_length=300)
    resource = models.CharField(max_length=100, blank=True)
    quantity = models.DecimalField(max_digits=20, decimal_places=6, default=0)
    unit = models.CharField(max_length=40, blank=True)
    amount_minor = models.BigIntegerField()

    class Meta:
        ordering = ["pk"]

    def __str__(self):
        return self.description


class MeterPush(models.Model):
    """The Stripe outbox: one row per ledger row to send as a meter event, sent at most once."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent"
        SKIPPED = "skipped", "Skipped (nothing to bill)"

    usage = models.OneToOneField(
        UsageRecord, on_delete=models.PROTECT, primary_key=True, related_name="meter_push"
    )
    state = models.CharField(max_length=10, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    last_error = models.TextField(blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=models.Q(state="pending"),
                name="meter_push_due",
            ),
        ]

    def __str__(self):
        return f"usage {self.usage_id}: {self.state}"


class StripeObject(models.Model):
    """Which Stripe object stands for one of ours (a product, price or meter per resource)."""

    kind = models.CharField(max_length=20)
    key = models.CharField(max_length=200)
    stripe_id = models.CharField(max_length=100)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["kind", "key"], name="stripe_object_once"),
        ]

    def __str__(self):
        return f"{self.kind} {self.key}: {self.stripe_id}"


class WebhookEvent(models.Model):
    """Each Stripe event id, stored on receipt so a redelivery is recognised and ignored."""

    event_id = models.CharField(max_length=100, unique=True)
    type = models.CharField(max_length=100)
    object_id = models.CharField(
        max_length=100, blank=True, db_index=True, help_text="The id of the event's object."
    )
    created = models.DateTimeField(help_text="When Stripe created the event.")
    payload = models.JSONField()
    received_at = models.DateTimeField(default=timezone.now)
    processed_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-received_at"]

    def __str__(self):
        return f"{self.event_id} {self.type}"


class Reconciliation(OrganizationOwned):
    """One day and resource of one organization: the ledger's total against Stripe's."""

    day = models.DateField()
    resource = models.CharField(max_length=100)
    ledger_minor = models.BigIntegerField()
    stripe_minor = models.BigIntegerField()
    checked_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-day", "organization_id", "resource"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "day", "resource"], name="reconciliation_once"
            ),
        ]

    @property
    def difference_minor(self) -> int:
        return self.ledger_minor - self.stripe_minor

    def __str__(self):
        return f"{self.organization_id} {self.day} {self.resource}: {self.difference_minor}"
