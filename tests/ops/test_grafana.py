"""The Grafana dashboard under docker/grafana reads only metrics that web and the control plane
export, under the names and labels they export them with."""

import json
import re
from pathlib import Path

import pytest
from django.db import transaction
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from billing.services import budget_alert_mail
from factory_saas.metrics import exposition
from factory_saas.pool_metrics import PoolCollector
from outbox.services import message_enqueue
from tests.factories import JobFactory

DASHBOARD = Path(__file__).resolve().parents[2] / "docker" / "grafana" / "factory-saas.json"
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
TOKEN = "scrape-token-0123456789"


def _exported(text: str) -> dict[str, set[str]]:
    """Each sample name a query can use, with the labels its family has (HELP/TYPE lines come
    even before a labelled metric has samples; its labels then from the code)."""
    names = {}
    for family in text_string_to_metric_families(text):
        labels = {label for sample in family.samples for label in sample.labels} | {"le"}
        for suffix in SUFFIXES.get(family.type, [""]):
            names[family.name + suffix] = labels
    return names


@pytest.mark.django_db
@override_settings(METRICS_TOKEN=TOKEN)
def test_every_query_names_an_exported_metric_and_its_labels(client, org):
    import jobs.tasks  # noqa: F401  the control plane's worker imports its tasks, so their metrics
    from serving.metrics import PREDICTION_SECONDS

    JobFactory(organization=org)
    with transaction.atomic():
        message_enqueue(handler=budget_alert_mail, payload={"alert_id": 0})
    client.get("/healthz")
    web = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).content.decode()
    exported = _exported(web) | _exported(exposition([PoolCollector()]).decode())
    for name in (
        "factory_prediction_latency_seconds_bucket",
        "factory_prediction_latency_seconds_count",
    ):
        exported[name] |= set(PREDICTION_SECONDS._labelnames)

    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(queries) >= 15
    for query in queries:
        metrics = re.findall(r"\b((?:factory|django)_[a-z0-9_]+)\b", query)
        assert metrics, query
        for metric in metrics:
            assert metric in exported, f"{metric} is not exported: {query}"
            used = set(re.findall(r"(\w+)\s*(?:=~|!=|=)\s*\"", query))
            used |= {
                label.strip()
                for group in re.findall(r"by \(([^)]*)\)", query)
                for label in group.split(",")
            }
            # Prometheus adds namespace (and pod, instance) to every series it scrapes.
            assert used - {"namespace"} <= exported[metric], (query, exported[metric])


def test_panels_are_distinct_and_read_the_chosen_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])
