"""Celery entry points of the pool: the scheduler tick and running one attempt on a worker."""

import os
from datetime import timedelta

from celery import shared_task
from django.conf import settings

from jobs.metrics import tick_observed
from jobs.runner.parent import run_attempt as run_attempt_service
from jobs.scheduler.apply import scheduler_pass
from jobs.services.storage_sweep import storage_orphans_sweep


@shared_task(name="jobs.scheduler_tick", ignore_result=True, soft_time_limit=50, time_limit=60)
def scheduler_tick() -> None:
    tick_observed(scheduler_pass)


@shared_task(
    name="jobs.run_attempt", ignore_result=True, acks_late=True, reject_on_worker_lost=True
)
def run_attempt(job_id: int, attempt: int) -> str:
    # Sent to one worker's own queue; that worker's id is in its environment (see run_worker).
    return run_attempt_service(
        job_id=job_id, attempt=attempt, worker_id=int(os.environ["FACTORY_WORKER_ID"])
    )


@shared_task(name="jobs.storage_sweep", ignore_result=True, soft_time_limit=1800, time_limit=1900)
def storage_sweep() -> int:
    return len(storage_orphans_sweep(older_than=timedelta(seconds=settings.STORAGE_ORPHAN_AGE_S)))
