"""Operators see what is owed, what failed and why, and can ask for another try."""

from django.contrib import admin, messages

from .models import Message
from .services import message_retry_now


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = [
        "created_at",
        "owed_since",
        "handler",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
    ]
    list_filter = ["state", "handler"]
    search_fields = ["handler", "key", "last_error"]
    date_hierarchy = "created_at"
    actions = ["retry_now"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in Message._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.action(description="Try again at the next drain (owed afresh from now)")
    def retry_now(self, request, queryset):
        for message in queryset:
            message_retry_now(message=message)
        self.message_user(request, f"{queryset.count()} messages due again.", messages.SUCCESS)
