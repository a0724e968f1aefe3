"""Operators see every organization's deployments and the loop's steps; changes go through the
tenant's pages and API, where they are checked and audited."""

from django.contrib import admin

from .models import Deployment, DriftReport, LoopEvent, ModelCard, Replica, Retrain, Route


class RouteInline(admin.TabularInline):
    model = Route
    extra = 0
    readonly_fields = ["model_version", "weight", "mode", "stage", "created_at"]
    can_delete = False


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "organization",
        "recipe",
        "resource_class",
        "min_replicas",
        "max_replicas",
        "last_request_at",
    ]
    list_filter = ["recipe", "resource_class"]
    search_fields = ["name", "organization__slug"]
    inlines = [RouteInline]
    readonly_fields = ["organization", "created_by", "created_at", "last_request_at"]


@admin.register(Replica)
class ReplicaAdmin(admin.ModelAdmin):
    list_display = ["pk", "deployment", "model_version", "state", "job", "ready_at"]
    list_filter = ["state"]
    readonly_fields = [field.name for field in Replica._meta.fields]


@admin.register(DriftReport)
class DriftReportAdmin(admin.ModelAdmin):
    list_display = ["deployment", "model_version", "window_end", "rows", "drifted", "drifted_share"]
    list_filter = ["drifted"]
    readonly_fields = [field.name for field in DriftReport._meta.fields]


@admin.register(LoopEvent)
class LoopEventAdmin(admin.ModelAdmin):
    list_display = ["deployment", "kind", "created_at", "cost_minor"]
    list_filter = ["kind"]
    readonly_fields = [field.name for field in LoopEvent._meta.fields]


@admin.register(Retrain)
class RetrainAdmin(admin.ModelAdmin):
    list_display = ["pk", "deployment", "state", "champion", "challenger", "canary_percent"]
    list_filter = ["state"]
    readonly_fields = [field.name for field in Retrain._meta.fields]


@admin.register(ModelCard)
class ModelCardAdmin(admin.ModelAdmin):
    list_display = ["model_version", "champion", "decision", "approved_via", "created_at"]
    list_filter = ["decision", "approved_via"]
    readonly_fields = [field.name for field in ModelCard._meta.fields]
