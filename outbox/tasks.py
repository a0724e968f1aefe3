"""Celery entry points of the outbox (thin: each calls one service)."""

from celery import shared_task

from . import services


@shared_task(name="outbox.deliver", ignore_result=True, soft_time_limit=120, time_limit=150)
def deliver(message_id: int) -> bool:
    return services.message_deliver(message_id=message_id)


@shared_task(name="outbox.drain", ignore_result=True, soft_time_limit=120, time_limit=150)
def drain() -> int:
    return services.outbox_drain()
