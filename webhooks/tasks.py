"""Celery entry points of webhooks (thin: each calls one service)."""

from celery import shared_task

from . import services


@shared_task(name="webhooks.deliver", ignore_result=True, soft_time_limit=60, time_limit=90)
def deliver(delivery_id: int) -> bool:
    return services.delivery_attempt(delivery_id=delivery_id)


@shared_task(name="webhooks.drain", ignore_result=True, soft_time_limit=120, time_limit=150)
def drain() -> int:
    return services.webhooks_drain()


@shared_task(name="webhooks.log_expire", ignore_result=True, soft_time_limit=600, time_limit=660)
def log_expire() -> int:
    return services.webhook_log_expire()
