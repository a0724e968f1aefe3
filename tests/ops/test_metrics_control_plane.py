"""The control plane's /metrics, in this process: the scheduler tick on real jobs moves queue
depth, placements, tick duration and free slots; queue depth per tenant stays bounded; the
outboxes' lag (the webhook outbox's too) is read from their rows."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from billing.services import budget_alert_mail
from factory_saas.metrics import exposition
from factory_saas.pool_metrics import OTHER_TENANTS, PoolCollector
from jobs.services.pool import worker_register
from jobs.tasks import scheduler_tick
from outbox.models import Message
from outbox.services import message_enqueue
from tests.factories import JobFactory, OrganizationFactory
from tests.ops.scrape import samples, value
from webhooks.models import WebhookDelivery, WebhookEndpoint
from webhooks.services import event_publish

pytestmark = pytest.mark.django_db


def _scrape() -> dict:
    return samples(exposition([PoolCollector()]).decode())


def test_a_tick_on_real_jobs_moves_queue_depth_placements_and_tick_duration(org):
    worker_register(name="cpu-metrics", devices=[])  # WORKER_CPU_SLOTS (2) cpu slots
    for _ in range(3):
        JobFactory(organization=org)
    before = _scrape()
    assert value(before, "factory_queue_jobs", resource_class="cpu") == 3
    assert value(before, "factory_queue_tenant_jobs", organization=org.slug) == 3
    assert value(before, "factory_pool_free_slots", resource_class="cpu") == 2
    assert value(before, "factory_pool_read_up") == 1

    scheduler_tick()

    after = _scrape()
    assert value(after, "factory_queue_jobs", resource_class="cpu") == 1
    assert value(after, "factory_queue_tenant_jobs", organization=org.slug) == 1
    assert value(after, "factory_jobs", resource_class="cpu", state="scheduled") == 2
    assert value(after, "factory_pool_free_slots", resource_class="cpu") == 0
    assert value(after, "factory_pool_slots", resource_class="cpu", status="online") == 2

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("factory_scheduler_placements_total") == 2
    assert moved("factory_scheduler_preemptions_total") == 0
    assert moved("factory_scheduler_ticks_total", outcome="ran") == 1
    assert moved("factory_scheduler_tick_seconds_count") == 1
    assert moved("factory_scheduler_tick_seconds_sum") > 0


@override_settings(METRICS_TOP_TENANTS=2)
def test_queue_depth_per_tenant_names_the_top_tenants_and_sums_the_rest():
    sizes = {"big": 5, "middle": 3, "small-a": 1, "small-b": 1}
    for slug, count in sizes.items():
        organization = OrganizationFactory(slug=slug)
        for _ in range(count):
            JobFactory(organization=organization)
    scraped = _scrape()
    per_tenant = {
        dict(labels)["organization"]: count
        for (name, labels), count in scraped.items()
        if name == "factory_queue_tenant_jobs"
    }
    assert per_tenant == {"big": 5, "middle": 3, OTHER_TENANTS: 2}
    assert value(scraped, "factory_queue_jobs", resource_class="cpu") == sum(sizes.values())


def test_outbox_and_meter_event_lag_come_from_the_oldest_pending_row():
    with transaction.atomic():
        owed = message_enqueue(handler=budget_alert_mail, payload={"alert_id": 0})
    Message.objects.filter(pk=owed.pk).update(owed_since=timezone.now() - timedelta(minutes=5))
    scraped = _scrape()
    handler = owed.handler
    assert value(scraped, "factory_outbox_messages", handler=handler, state="pending") == 1
    assert 300 <= value(scraped, "factory_outbox_lag_seconds", handler=handler) < 360
    assert value(scraped, "factory_meter_events_pending") == 0
    assert value(scraped, "factory_meter_events_lag_seconds") == 0


def test_webhook_outbox_lag_is_the_oldest_delivery_owed_to_an_enabled_endpoint(org):
    assert value(_scrape(), "factory_webhook_outbox_lag_seconds") == 0
    endpoint = WebhookEndpoint.objects.create(
        organization=org, url="https://93.184.215.14/", event_types=["job.failed"]
    )
    with transaction.atomic():
        event_publish(organization=org, type="job.failed", data={})
    WebhookDelivery.objects.update(owed_since=timezone.now() - timedelta(minutes=5))
    scraped = _scrape()
    assert value(scraped, "factory_webhook_deliveries_pending") == 1
    assert 300 <= value(scraped, "factory_webhook_outbox_lag_seconds") < 360
    # A disabled endpoint's deliveries wait for a person, not for the drain: no lag.
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(enabled=False)
    assert value(_scrape(), "factory_webhook_outbox_lag_seconds") == 0
