from django.contrib import admin

from .models import Price, UsageRecord


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    list_display = ["resource", "unit", "unit_price", "currency", "effective_from"]
    list_filter = ["resource", "currency"]
    search_fields = ["resource"]


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
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

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
