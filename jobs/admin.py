"""Operator console for the pool: cordon, drain, uncordon; cancel or requeue jobs; quotas;
the runtimes workers report (read only)."""

from django.contrib import admin, messages
from django.db.models import Count, Q

from tenants.actors import Actor

from .models import (
    Job,
    JobAttempt,
    JobEvent,
    JobState,
    Quota,
    ResourceClass,
    Runtime,
    Worker,
    WorkerRuntime,
)
from .services import job_cancel
from .services.pool import job_preempt, worker_set_status


@admin.register(ResourceClass)
class ResourceClassAdmin(admin.ModelAdmin):
    list_display = ["name", "display_name", "gpu_memory_gb", "device_name_patterns"]
    search_fields = ["name", "display_name"]


def _set_status(status):
    def action(modeladmin, request, queryset):
        for worker in queryset:
            worker_set_status(worker=worker, status=status)
        messages.success(request, f"{queryset.count()} worker(s) now {status}.")

    action.__name__ = f"make_{status}"
    action.short_description = {
        "cordoned": "Cordon (place nothing new)",
        "draining": "Drain (finish running jobs, place nothing new)",
        "online": "Uncordon",
    }[status]
    return action


class _ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class WorkerRuntimeInline(_ReadOnlyInline):
    """A worker's runtimes as it reported them at its last start."""

    model = WorkerRuntime
    fields = ["runtime", "interpreter", "error", "reported_at"]
    readonly_fields = fields


class RuntimeWorkerInline(_ReadOnlyInline):
    """The workers that reported a runtime, working or broken."""

    model = WorkerRuntime
    fields = ["worker", "interpreter", "error", "reported_at"]
    readonly_fields = fields
    verbose_name_plural = "workers reporting it"


@admin.register(Runtime)
class RuntimeAdmin(admin.ModelAdmin):
    """Workers' reports are the source of runtimes: nothing here is added, changed or deleted
    (a runtime no worker offers any more stays, for the jobs that name it)."""

    list_display = ["name", "python_version", "package_count", "workers", "last_seen_at"]
    search_fields = ["name"]
    readonly_fields = ["name", "python_version", "packages", "created_at", "last_seen_at"]
    inlines = [RuntimeWorkerInline]

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .annotate(
                working=Count("worker_reports", filter=Q(worker_reports__error="")),
                reporting=Count("worker_reports"),
            )
        )

    @admin.display(description="Packages")
    def package_count(self, obj):
        return len(obj.packages)

    @admin.display(description="Workers (working/reporting)")
    def workers(self, obj):
        return f"{obj.working}/{obj.reporting}"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "resource_class",
        "slots",
        "status",
        "last_heartbeat_at",
        "software_version",
    ]
    list_filter = ["status", "resource_class"]
    search_fields = ["name", "hostname", "queue"]
    readonly_fields = [
        "name",
        "queue",
        "hostname",
        "devices",
        "software_version",
        "registered_at",
        "last_heartbeat_at",
        "status",
    ]
    inlines = [WorkerRuntimeInline]
    actions = [
        _set_status(Worker.Status.CORDONED),
        _set_status(Worker.Status.DRAINING),
        _set_status(Worker.Status.ONLINE),
    ]


@admin.register(Quota)
class QuotaAdmin(admin.ModelAdmin):
    list_display = [
        "organization",
        "resource_class",
        "guaranteed_gpus",
        "limit_gpus",
        "max_running_jobs",
        "max_queued_jobs",
    ]
    list_filter = ["resource_class"]
    search_fields = ["organization__name", "organization__slug"]
    list_editable = ["guaranteed_gpus", "limit_gpus", "max_running_jobs", "max_queued_jobs"]
    autocomplete_fields = ["organization"]


class JobAttemptInline(admin.TabularInline):
    model = JobAttempt
    extra = 0
    can_delete = False
    fields = [
        "number",
        "worker",
        "slot_indices",
        "scheduled_at",
        "started_at",
        "ended_at",
        "outcome",
    ]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


class JobEventInline(admin.TabularInline):
    model = JobEvent
    extra = 0
    can_delete = False
    fields = ["created_at", "attempt", "kind", "message"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


@admin.action(description="Cancel selected jobs")
def cancel_jobs(modeladmin, request, queryset):
    done = 0
    for job in queryset.exclude(
        state__in=[JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.CANCELLING]
    ):
        job_cancel(job=job, actor=Actor(user=request.user, ip=request.META.get("REMOTE_ADDR")))
        done += 1
    messages.success(request, f"{done} job(s) cancelled or cancelling.")


@admin.action(description="Requeue selected running jobs (they resume from their checkpoint)")
def requeue_jobs(modeladmin, request, queryset):
    reason = f"Requeued by operator {request.user.email}."
    count = sum(
        job_preempt(job_id=job.pk, reason=reason) for job in queryset.filter(state=JobState.RUNNING)
    )
    messages.success(request, f"{count} job(s) asked to checkpoint and go back to the queue.")


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "organization",
        "recipe",
        "state",
        "resource_class",
        "gpu_count",
        "priority",
        "attempt",
        "worker",
        "created_at",
    ]
    list_filter = ["state", "resource_class", "recipe", "organization"]
    search_fields = ["id", "recipe", "organization__name", "created_by__email"]
    list_select_related = ["organization", "resource_class", "worker"]
    date_hierarchy = "created_at"
    actions = [cancel_jobs, requeue_jobs]
    inlines = [JobAttemptInline, JobEventInline]

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields if f.name != "priority"]

    def has_add_permission(self, request):
        return False
