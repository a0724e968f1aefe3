"""Operator console for billing: rate card, plans, accounts, credits, the ledger and Stripe sync."""

from django import forms
from django.contrib import admin, messages
from django.utils import timezone

from tenants.actors import Actor
from tenants.admin import ReadOnlyAdmin
from tenants.services import audit_record

from . import services
from .errors import BillingError
from .invoicing import invoice_mark_paid
from .models import (
    BillingAccount,
    BudgetAlert,
    CreditGrant,
    Invoice,
    InvoiceLine,
    MeterPush,
    Plan,
    Price,
    Reconciliation,
    StripeObject,
    UsageRecord,
    UsageTally,
    WebhookEvent,
)
from .selectors import (
    STUCK_ATTEMPTS,
    STUCK_OVERDUE,
    meter_push_stuck,
    reconciliation_differences,
)


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    """The rate card: add a row with a later effective date to change a price; past usage keeps
    the price it was recorded at."""

    list_display = ["resource", "unit", "unit_price", "currency", "effective_from"]
    list_filter = ["resource", "currency"]
    search_fields = ["resource"]

    def get_readonly_fields(self, request, obj=None):
        # A price that already took effect is history: change prices by adding a new row.
        if obj is not None and obj.effective_from <= timezone.now():
            return ["resource", "unit", "unit_price", "currency", "effective_from"]
        return []


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin):
    list_display = [
        "code",
        "name",
        "monthly_fee_minor",
        "included_credit_minor",
        "trial_credit_minor",
        "limit_gpus",
        "guaranteed_gpus",
        "is_default",
        "active",
    ]
    list_filter = ["active"]


@admin.register(BillingAccount)
class BillingAccountAdmin(admin.ModelAdmin):
    list_display = [
        "organization",
        "plan",
        "monthly_budget_minor",
        "budget_hard_cap",
        "past_due_since",
        "stripe_customer_id",
    ]
    list_filter = ["plan", "budget_hard_cap"]
    search_fields = ["organization__name", "organization__slug", "stripe_customer_id"]
    list_select_related = ["organization", "plan"]
    # The budget is the tenant's own setting (billing page, with its checks and audit event).
    readonly_fields = [
        "organization",
        "monthly_budget_minor",
        "budget_thresholds",
        "budget_hard_cap",
        "stripe_customer_id",
        "stripe_subscription_id",
        "created_at",
    ]

    def has_add_permission(self, request):
        return False  # accounts are created with their organization's first billing read

    def save_model(self, request, obj, form, change):
        plan_changed = change and "plan" in form.changed_data
        new_plan = obj.plan
        if plan_changed:
            obj.plan_id = form.initial["plan"]  # the service moves the plan, below
        super().save_model(request, obj, form, change)
        edited = [name for name in form.changed_data if name != "plan"]
        if change and edited:
            audit_record(
                organization=obj.organization,
                actor=Actor(user=request.user),
                action="billing.account_edited",
                target=obj,
                data={name: str(form.cleaned_data[name]) for name in edited},
            )
        if plan_changed:
            # Through the service: the storage quota follows, trial credits, an audit event.
            services.plan_change(
                organization=obj.organization, plan=new_plan, actor=Actor(user=request.user)
            )


class CreditGrantForm(forms.ModelForm):
    class Meta:
        model = CreditGrant
        fields = ["organization", "amount_minor", "reason", "expires_at"]


@admin.register(CreditGrant)
class CreditGrantAdmin(admin.ModelAdmin):
    """Grant credits here; they are consumed, soonest expiry first, before invoicing."""

    form = CreditGrantForm
    list_display = [
        "created_at",
        "organization",
        "amount_minor",
        "remaining_minor",
        "reason",
        "expires_at",
        "granted_by",
    ]
    search_fields = ["organization__name", "reason"]
    list_select_related = ["organization", "granted_by"]

    def has_change_permission(self, request, obj=None):
        return obj is None

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        grant, _ = services.credit_grant(
            organization=obj.organization,
            amount_minor=obj.amount_minor,
            reason=obj.reason,
            granted_by=request.user,
            expires_at=obj.expires_at,
        )
        obj.pk = grant.pk


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = [
        "period_end",
        "organization",
        "resource",
        "quantity",
        "unit",
        "amount_minor",
        "currency",
        "source_id",
        "attempt",
    ]
    list_filter = ["resource", "organization", "currency"]
    search_fields = ["idempotency_key", "source_id", "organization__name"]
    list_select_related = ["organization"]
    date_hierarchy = "period_end"


@admin.register(UsageTally)
class UsageTallyAdmin(ReadOnlyAdmin):
    list_display = ["month", "organization", "resource", "billed_minor", "exact_minor", "currency"]
    list_filter = ["month", "resource"]
    list_select_related = ["organization"]


class StuckFilter(admin.SimpleListFilter):
    title = "stuck"
    parameter_name = "stuck"

    def lookups(self, request, model_admin):
        return [("yes", f"Stuck ({STUCK_ATTEMPTS}+ failures or overdue {STUCK_OVERDUE})")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset & meter_push_stuck(now=timezone.now())
        return queryset


@admin.register(MeterPush)
class MeterPushAdmin(ReadOnlyAdmin):
    """The Stripe outbox: a row is sent once, after success; failures back off and retry."""

    list_display = ["usage", "state", "attempts", "next_attempt_at", "sent_at", "last_error"]
    list_filter = ["state", StuckFilter]
    list_select_related = ["usage"]
    actions = ["retry_now"]

    def has_change_permission(self, request, obj=None):
        return obj is None  # the list may run its action; single rows stay read-only

    @admin.action(description="Retry now")
    def retry_now(self, request, queryset):
        count = queryset.filter(state=MeterPush.State.PENDING).update(
            next_attempt_at=timezone.now()
        )
        messages.success(request, f"{count} meter event(s) will be sent on the next push.")


class InvoiceLineInline(admin.TabularInline):
    model = InvoiceLine
    extra = 0
    can_delete = False

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in InvoiceLine._meta.fields]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Invoice)
class InvoiceAdmin(ReadOnlyAdmin):
    actions = ["mark_paid"]
    list_display = [
        "number",
        "organization",
        "source",
        "status",
        "period_start",
        "total_minor",
        "currency",
    ]
    list_filter = ["source", "status"]
    search_fields = ["number", "stripe_id", "organization__name"]
    list_select_related = ["organization"]
    inlines = [InvoiceLineInline]

    def has_change_permission(self, request, obj=None):
        return obj is None  # the list may run its action; invoices stay read-only

    @admin.action(description="Mark paid (built-in invoices: the transfer arrived)")
    def mark_paid(self, request, queryset):
        paid = 0
        for invoice in queryset:
            try:
                invoice_mark_paid(invoice=invoice, actor=Actor(user=request.user))
            except BillingError as error:
                messages.error(request, f"{invoice}: {error.detail}")
            else:
                paid += 1
        if paid:
            messages.success(request, f"{paid} invoice(s) marked paid.")


@admin.register(BudgetAlert)
class BudgetAlertAdmin(ReadOnlyAdmin):
    list_display = ["month", "organization", "threshold", "spend_minor", "budget_minor"]
    list_select_related = ["organization"]


class DifferenceFilter(admin.SimpleListFilter):
    title = "difference"
    parameter_name = "differs"

    def lookups(self, request, model_admin):
        return [("yes", "Ledger and Stripe differ")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset & reconciliation_differences()
        return queryset


@admin.register(Reconciliation)
class ReconciliationAdmin(ReadOnlyAdmin):
    list_display = ["day", "organization", "resource", "ledger_minor", "stripe_minor", "checked_at"]
    list_filter = [DifferenceFilter, "resource"]
    list_select_related = ["organization"]


@admin.register(WebhookEvent)
class WebhookEventAdmin(ReadOnlyAdmin):
    list_display = ["event_id", "type", "created", "received_at", "processed_at", "error"]
    list_filter = ["type"]
    search_fields = ["event_id"]


@admin.register(StripeObject)
class StripeObjectAdmin(ReadOnlyAdmin):
    list_display = ["kind", "key", "stripe_id", "created_at"]
