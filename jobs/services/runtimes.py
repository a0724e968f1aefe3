"""The runtimes workers report: one Runtime row per name, one WorkerRuntime per worker and name."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from jobs.models import Runtime, Worker, WorkerRuntime
from jobs.runtimes import RuntimeReport


def worker_runtimes_record(
    *, worker: Worker, reports: Sequence[RuntimeReport], now: datetime
) -> None:
    """Replace what `worker` offers with its latest reports (inside its registration).

    A runtime the worker no longer lists is no longer its; the Runtime row stays, for the console
    and for jobs that name it. A healthy report refreshes the runtime's Python version and
    packages: operators install one name the same everywhere, and the last worker seen says what
    that is now. A broken one changes only this worker's row.
    """
    WorkerRuntime.objects.filter(worker=worker).exclude(
        runtime__name__in=[r.name for r in reports]
    ).delete()
    for report in reports:
        runtime, _ = Runtime.objects.select_for_update().get_or_create(
            name=report.name, defaults={"created_at": now, "last_seen_at": now}
        )
        if not report.error:
            runtime.python_version = report.python_version
            runtime.packages = dict(sorted(report.packages.items(), key=lambda p: p[0].lower()))
            runtime.last_seen_at = now
            runtime.save(update_fields=["python_version", "packages", "last_seen_at"])
        WorkerRuntime.objects.update_or_create(
            worker=worker,
            runtime=runtime,
            defaults={
                "interpreter": report.interpreter[:500],
                "error": report.error,
                "reported_at": now,
            },
        )
