"""Asking for a scheduling pass now rather than at the next periodic tick."""

from celery import current_app


def tick_soon() -> None:
    current_app.send_task("jobs.scheduler_tick")
