"""Operators see every endpoint, what is owed to it and what its receiver answered."""

from django.contrib import admin

from .models import WebhookAttempt, WebhookDelivery, WebhookEndpoint


class _ReadOnly(admin.ModelAdmin):
    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(_ReadOnly):
    list_display = ["url", "organization", "enabled", "last_success_at", "created_at"]
    list_filter = ["enabled"]
    search_fields = ["url", "organization__slug"]


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(_ReadOnly):
    list_display = [
        "created_at",
        "organization",
        "endpoint",
        "state",
        "attempts",
        "last_status",
        "next_attempt_at",
    ]
    list_filter = ["state"]
    search_fields = ["message_id", "endpoint__url", "organization__slug"]
    date_hierarchy = "created_at"


@admin.register(WebhookAttempt)
class WebhookAttemptAdmin(_ReadOnly):
    list_display = ["started_at", "organization", "delivery", "number", "status_code", "error"]
    search_fields = ["delivery__message_id"]
