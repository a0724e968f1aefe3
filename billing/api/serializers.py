from rest_framework import serializers

from billing.models import BillingAccount, CreditGrant, Plan


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
