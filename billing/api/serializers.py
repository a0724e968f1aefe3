from functools import cache

from rest_framework import serializers

from billing.models import BillingAccount, CreditGrant, Invoice, InvoiceLine, Plan


class PlanSerializer(serializers.ModelSerializer):
    class Meta:
        model = Plan
        fields = [
            "code",
            "name",
            "description",
            "monthly_fee_minor",
            "included_credit_minor",
            "trial_credit_minor",
            "guaranteed_gpus",
            "limit_gpus",
            "max_running_jobs",
            "storage_quota_bytes",
        ]


class BillingAccountSerializer(serializers.ModelSerializer):
    plan = PlanSerializer(read_only=True)
    currency = serializers.CharField(read_only=True)
    month_spend_minor = serializers.IntegerField(read_only=True)
    credits_available_minor = serializers.IntegerField(read_only=True)
    budget_used_percent = serializers.FloatField(read_only=True, allow_null=True)
    placement_blocked = serializers.CharField(
        read_only=True, help_text="Why new jobs wait (budget, payment), or empty."
    )
    # Blank until set, so not described as an email address (an empty string is not one).
    billing_email = serializers.CharField(
        read_only=True, help_text="Where invoices go; empty: the owners."
    )

    class Meta:
        model = BillingAccount
        fields = [
            "plan",
            "billing_email",
            "monthly_budget_minor",
            "budget_thresholds",
            "budget_hard_cap",
            "past_due_since",
            "currency",
            "month_spend_minor",
            "credits_available_minor",
            "budget_used_percent",
            "placement_blocked",
        ]
        read_only_fields = fields


class BudgetSerializer(serializers.Serializer):
    monthly_budget_minor = serializers.IntegerField(
        min_value=0, max_value=10**13, allow_null=True, help_text="Cents per month; null: none."
    )
    budget_thresholds = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=1000),
        max_length=10,
        required=False,
        help_text="Percentages of the budget that alert (email, banner, audit event).",
    )
    budget_hard_cap = serializers.BooleanField(
        required=False, help_text="When reached, new jobs wait with 'budget reached'."
    )
    billing_email = serializers.EmailField(required=False, allow_blank=True)


class CreditGrantSerializer(serializers.ModelSerializer):
    class Meta:
        model = CreditGrant
        fields = [
            "id",
            "amount_minor",
            "remaining_minor",
            "currency",
            "reason",
            "expires_at",
            "created_at",
        ]
        read_only_fields = fields


class InvoiceSerializer(serializers.ModelSerializer):
    # Blank for built-in invoices, so not described as URIs (an empty string is not one).
    hosted_url = serializers.CharField(read_only=True, help_text="Stripe's page, or empty.")
    pdf_url = serializers.CharField(read_only=True, help_text="Stripe's PDF, or empty.")

    class Meta:
        model = Invoice
        fields = [
            "id",
            "number",
            "source",
            "status",
            "currency",
            "period_start",
            "period_end",
            "subtotal_minor",
            "credits_minor",
            "tax_minor",
            "total_minor",
            "hosted_url",
            "pdf_url",
            "issued_at",
            "paid_at",
            "created_at",
        ]
        read_only_fields = fields


class InvoiceLineSerializer(serializers.ModelSerializer):
    class Meta:
        model = InvoiceLine
        fields = ["description", "resource", "quantity", "unit", "amount_minor"]
        read_only_fields = fields


class InvoiceDetailSerializer(InvoiceSerializer):
    lines = InvoiceLineSerializer(
        many=True,
        read_only=True,
        help_text='Charges, then the tax line (resource "tax"); charges sum to subtotal_minor.',
    )

    class Meta(InvoiceSerializer.Meta):
        fields = [*InvoiceSerializer.Meta.fields, "lines"]
        read_only_fields = fields


class UsageRowSerializer(serializers.Serializer):
    group = serializers.CharField(
        help_text='What the row is: a resource, a day, an email, "(none)".'
    )
    key = serializers.CharField(
        allow_null=True, help_text="Its identity: the date, user id, key id, job id; null: none."
    )
    quantity = serializers.DecimalField(
        max_digits=20,
        decimal_places=6,
        allow_null=True,
        help_text="Units used, when every row of the group has the same unit; else null.",
    )
    unit = serializers.CharField()
    amount_minor = serializers.IntegerField()
    currency = serializers.CharField()


class UsageDaySerializer(serializers.Serializer):
    date = serializers.DateField(source="day")
    amounts = serializers.DictField(
        child=serializers.IntegerField(), help_text="Cost per resource in the report's currency."
    )
    total_minor = serializers.IntegerField()


class UsageTotalSerializer(serializers.Serializer):
    currency = serializers.CharField()
    amount_minor = serializers.IntegerField()


class UsageReportSerializer(serializers.Serializer):
    start = serializers.DateField()
    end = serializers.DateField()
    group_by = serializers.CharField()
    label_key = serializers.CharField()
    currency = serializers.CharField()
    total_minor = serializers.IntegerField(help_text="The ledger's sum for the range, in cents.")
    totals = UsageTotalSerializer(
        many=True, help_text="One total per currency (a ledger normally has only one)."
    )
    rows = UsageRowSerializer(many=True, help_text="Most spent first; by date for group_by=day.")
    daily = UsageDaySerializer(many=True, help_text="Every day of the range, zero-filled.")


def usage_report_data(report) -> dict:
    """UsageReportSerializer(report).data, the same dict field by field, each value shown by the
    serializer's own field: DRF's serializers cost the usage summary about 0.4 ms of CPU a
    request for its 40 small nested rows (docs/benchmarks.md, API under load)."""
    return _plain_data(_usage_report_plan(), report)


@cache
def _usage_report_plan() -> tuple:
    return _plain_plan(UsageReportSerializer())


def _plain_plan(serializer: serializers.Serializer) -> tuple:
    """(name, attribute, nested plan or the field's to_representation, many) per field of a
    serializer whose fields read one attribute each and nest only lists of serializers."""
    plan = []
    for name, field in serializer.fields.items():
        if "." in field.source or field.source == "*":
            raise LookupError(f"{type(serializer).__name__}.{name} reads more than an attribute.")
        if isinstance(field, serializers.ListSerializer):
            plan.append((name, field.source, _plain_plan(field.child), True))
        elif isinstance(field, serializers.BaseSerializer):
            raise LookupError(f"{type(serializer).__name__}.{name} nests a single serializer.")
        else:
            plan.append((name, field.source, field.to_representation, False))
    return tuple(plan)


def _plain_data(plan: tuple, instance) -> dict:
    data = {}
    for name, attribute, show, many in plan:
        value = getattr(instance, attribute)
        if many:
            data[name] = [_plain_data(show, item) for item in value]
        else:  # as Serializer.to_representation: None is shown as None, whatever the field
            data[name] = None if value is None else show(value)
    return data


class CheckoutSessionRequestSerializer(serializers.Serializer):
    success_url = serializers.URLField(
        required=False,
        help_text=(
            "Where Stripe sends the browser after saving: an address under SITE_URL; "
            "default: the billing page."
        ),
    )
    cancel_url = serializers.URLField(
        required=False,
        help_text=(
            "Where Stripe sends the browser on cancel: an address under SITE_URL; "
            "default: the billing page."
        ),
    )


class PortalSessionRequestSerializer(serializers.Serializer):
    return_url = serializers.URLField(
        required=False,
        help_text=(
            "Where the portal's back link goes: an address under SITE_URL; "
            "default: the billing page."
        ),
    )


class StripeRedirectSerializer(serializers.Serializer):
    url = serializers.URLField(read_only=True, help_text="The Stripe-hosted page to open.")
