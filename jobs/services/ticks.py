"""Asking for a scheduling pass now rather than at the next periodic tick."""

import logging

from celery import current_app

logger = logging.getLogger(__name__)


def tick_soon() -> None:
    """Best effort: the change is committed and beat ticks every few seconds anyway, so a broker
    blip here must not turn a successful request into an error."""
    try:
        current_app.send_task("jobs.scheduler_tick")
    except Exception:  # the periodic tick picks the work up
        logger.warning("could not ask for a scheduling pass now", exc_info=True)
