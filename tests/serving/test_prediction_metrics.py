"""Prediction latency per deployment reaches the web's /metrics: a real request through the API
to a real HTTP replica, then a scrape."""

import re

import pytest
from django.test import Client, override_settings

pytestmark = pytest.mark.django_db

TOKEN = "scrape-token-0123456789"


def _count(text: str, organization: str, deployment: str, outcome: str) -> float:
    pattern = (
        r"^factory_prediction_latency_seconds_count\{"
        rf'deployment="{deployment}",mode="live",organization="{organization}",'
        rf'outcome="{outcome}"\}} (\S+)$'
    )
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@override_settings(METRICS_TOKEN=TOKEN)
def test_each_prediction_is_timed_under_its_deployment(
    org, member_factory, key_client_for, make_deployment, serve
):
    caller = key_client_for(member_factory(org, "developer"), org)
    deployment, (version,) = make_deployment(org, name="fraud", log_sample_rate=0.0)
    serve(deployment, version, "a")
    scrape = Client()

    def scraped():
        response = scrape.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert response.status_code == 200
        return _count(response.content.decode(), org.slug, "fraud", "ok")

    before = scraped()
    url = f"/api/v1/orgs/{org.slug}/deployments/fraud/predict/"
    for _ in range(3):
        response = caller.post(url, {"inputs": [{"x": 1}]}, format="json")
        assert response.status_code == 200, response.content
    assert scraped() == before + 3
