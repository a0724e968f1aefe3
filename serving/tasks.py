"""Serving's control-plane work: reconcile replicas, send shadow copies, price prediction
charges, expire the prediction log, purge deleted deployments."""

from celery import shared_task
from django.conf import settings

from . import gateway
from .metering import predictions_bill as predictions_bill_service
from .reconciler import replicas_reconcile as replicas_reconcile_service
from .services import deployments_purge as deployments_purge_service
from .services import prediction_log_expire as prediction_log_expire_service


@shared_task(
    name="serving.replicas_reconcile", ignore_result=True, soft_time_limit=50, time_limit=60
)
def replicas_reconcile() -> None:
    replicas_reconcile_service()


@shared_task(
    name="serving.prediction_log_expire", ignore_result=True, soft_time_limit=1700, time_limit=1800
)
def prediction_log_expire() -> int:
    return prediction_log_expire_service()


@shared_task(name="serving.predictions_bill", ignore_result=True, soft_time_limit=50, time_limit=60)
def predictions_bill() -> int:
    """Every pending charge, a batch per transaction, so a backlog drains in one run."""
    billed = total = predictions_bill_service()
    while billed == settings.SERVING_BILL_BATCH:
        billed = predictions_bill_service()
        total += billed
    return total


@shared_task(name="serving.shadow_drain", ignore_result=True, soft_time_limit=50, time_limit=60)
def shadow_drain() -> int:
    """The copies web processes queued since the last run, for most of one beat period."""
    return gateway.shadow_drain(budget_s=max(0.5, settings.SERVING_SHADOW_DRAIN_S * 0.8))


@shared_task(name="serving.shadow_send", ignore_result=True, soft_time_limit=50, time_limit=60)
def shadow_send(copies: list[dict]) -> int:
    """Copies sent as tasks where the cache is not Redis (the embedded default)."""
    return gateway.shadow_send(copies)


# Beat runs it every SERVING_PURGE_EVERY_S and a deletion asks for it after its commit; each run
# stops after SERVING_PURGE_BUDGET_S, well inside the time limits, and the next goes on.
@shared_task(
    name="serving.deployments_purge", ignore_result=True, soft_time_limit=240, time_limit=270
)
def deployments_purge() -> int:
    return deployments_purge_service()
