"""Operator console for the registry: versions are immutable; quotas are editable."""

from django.contrib import admin

from tenants.admin import ReadOnlyAdmin as BaseReadOnlyAdmin

from .models import (
    CodePackage,
    CodePackageVersion,
    Dataset,
    DatasetVersion,
    EdgeBundle,
    ModelAlias,
    ModelArtifact,
    ModelVersion,
    PendingUpload,
    RegisteredModel,
    StorageAccount,
)


class ReadOnlyAdmin(BaseReadOnlyAdmin):
    deletable = True  # versions are immutable, but an operator may delete one


@admin.register(Dataset)
class DatasetAdmin(admin.ModelAdmin):
    list_display = ["name", "organization", "created_by", "created_at"]
    list_filter = ["organization", "created_at"]
    search_fields = ["name", "description", "organization__name"]
    list_select_related = ["organization", "created_by"]
    readonly_fields = ["organization", "created_by", "created_at"]


@admin.register(DatasetVersion)
class DatasetVersionAdmin(ReadOnlyAdmin):
    list_display = [
        "dataset",
        "number",
        "organization",
        "state",
        "format",
        "row_count",
        "size_bytes",
        "source",
        "created_at",
    ]
    list_filter = ["state", "format", "source", "organization", "created_at"]
    search_fields = ["dataset__name", "sha256", "storage_key", "original_filename"]
    list_select_related = ["dataset", "organization"]


class ModelArtifactInline(admin.TabularInline):
    model = ModelArtifact
    extra = 0
    can_delete = False
    readonly_fields = ["name", "storage_key", "size_bytes", "sha256"]
    exclude = ["organization"]

    def has_add_permission(self, request, obj=None):
        return False


class EdgeBundleInline(admin.TabularInline):
    model = EdgeBundle
    extra = 0
    can_delete = False
    readonly_fields = [
        "storage_key",
        "size_bytes",
        "sha256",
        "self_check",
        "source_job_id",
        "created_by",
        "created_at",
    ]
    exclude = ["organization"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(RegisteredModel)
class RegisteredModelAdmin(admin.ModelAdmin):
    list_display = ["name", "organization", "created_by", "created_at"]
    list_filter = ["organization", "created_at"]
    search_fields = ["name", "description", "organization__name"]
    list_select_related = ["organization", "created_by"]
    readonly_fields = ["organization", "created_by", "created_at"]


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = [
        "registered_model",
        "number",
        "organization",
        "recipe_name",
        "source_job_id",
        "created_at",
    ]
    list_filter = ["recipe_name", "organization", "created_at"]
    search_fields = ["registered_model__name", "recipe_name"]
    list_select_related = ["registered_model", "organization"]
    inlines = [ModelArtifactInline, EdgeBundleInline]


@admin.register(ModelAlias)
class ModelAliasAdmin(ReadOnlyAdmin):
    list_display = [
        "registered_model",
        "name",
        "version",
        "organization",
        "updated_by",
        "updated_at",
    ]
    list_filter = ["name", "organization"]
    search_fields = ["registered_model__name", "name"]
    list_select_related = ["registered_model", "version", "organization", "updated_by"]


@admin.register(PendingUpload)
class PendingUploadAdmin(ReadOnlyAdmin):
    list_display = ["dataset", "original_filename", "organization", "created_at", "expires_at"]
    list_filter = ["organization", "created_at"]
    search_fields = ["dataset__name", "original_filename", "storage_key"]


@admin.register(StorageAccount)
class StorageAccountAdmin(admin.ModelAdmin):
    list_display = ["organization", "used_bytes", "quota_bytes", "updated_at"]
    search_fields = ["organization__name", "organization__slug"]
    list_select_related = ["organization"]
    readonly_fields = ["organization", "used_bytes", "updated_at"]

    def has_add_permission(self, request):
        return False


@admin.register(CodePackage)
class CodePackageAdmin(BaseReadOnlyAdmin):
    list_display = ["name", "organization", "created_by", "created_at"]
    list_filter = ["organization", "created_at"]
    search_fields = ["name", "organization__name"]
    list_select_related = ["organization", "created_by"]


@admin.register(CodePackageVersion)
class CodePackageVersionAdmin(BaseReadOnlyAdmin):
    """Read only, not even deletable here: a job's record of what code it ran must stay true."""

    list_display = [
        "package",
        "number",
        "organization",
        "archive_format",
        "size_bytes",
        "created_at",
    ]
    list_filter = ["archive_format", "organization", "created_at"]
    search_fields = ["package__name", "sha256", "storage_key", "original_filename"]
    list_select_related = ["package", "organization"]
