"""Celery entry points of the pool: the scheduler tick and running one attempt on a worker."""

import os

from celery import shared_task

from jobs.runner.parent import run_attempt as run_attempt_service
from jobs.scheduler.apply import scheduler_pass


@shared_task(name="jobs.scheduler_tick", ignore_result=True, soft_time_limit=50, time_limit=60)
def scheduler_tick() -> None:
    scheduler_pass()


@shared_task(
    name="jobs.run_attempt", ignore_result=True, acks_late=True, reject_on_worker_lost=True
)
def run_attempt(job_id: int, attempt: int) -> str:
    # Sent to one worker's own queue; that worker's id is in its environment (see run_worker).
    return run_attempt_service(
        job_id=job_id, attempt=attempt, worker_id=int(os.environ["FACTORY_WORKER_ID"])
    )
