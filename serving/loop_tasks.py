"""The loop's periodic entry point (beat: `serving-loop-tick`, every SERVING_LOOP_TICK_S).

Ticks may overlap (a retrain's data preparation copies a dataset): each deployment is advanced
under its row lock, skipped by a tick that finds it held, and a preparation is claimed."""

from celery import shared_task

from .loop import loop_tick_all


@shared_task(name="serving.loop_tick", ignore_result=True, soft_time_limit=240, time_limit=270)
def loop_tick() -> int:
    return loop_tick_all()
