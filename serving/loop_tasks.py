"""The loop's periodic entry point (beat: `serving-loop-tick`, every SERVING_LOOP_TICK_S)."""

from celery import shared_task

from .loop import loop_tick_all


@shared_task(name="serving.loop_tick", ignore_result=True, soft_time_limit=50, time_limit=60)
def loop_tick() -> int:
    return loop_tick_all()
