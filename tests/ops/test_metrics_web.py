"""The web's /metrics: refused without METRICS_TOKEN, whatever is sent; with it, only to
`Authorization: Bearer <token>`; what it serves."""

import pytest
from django.test import override_settings

pytestmark = pytest.mark.django_db

TOKEN = "scrape-token-0123456789"


@pytest.mark.parametrize("authorization", [None, "Bearer ", "Bearer", "Bearer anything"])
@override_settings(METRICS_TOKEN="")
def test_with_no_token_configured_every_scrape_is_refused(client, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 403
    assert b"METRICS_TOKEN" in response.content and b"django_http" not in response.content


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer ", "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x", TOKEN],
)
@override_settings(METRICS_TOKEN=TOKEN)
def test_a_scrape_without_the_token_is_401(client, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"django_http" not in response.content


@override_settings(METRICS_TOKEN=TOKEN)
def test_the_token_scrapes_request_latency_per_view(client):
    client.get("/healthz")
    response = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    text = response.content.decode()
    assert (
        'django_http_requests_latency_seconds_by_view_method_count{method="GET",view="healthz"}'
        in text
    )
    assert "# TYPE factory_prediction_latency_seconds histogram" in text
    # The pool's gauges are the control plane's, not read by every web replica.
    assert "factory_queue_jobs" not in text


@override_settings(METRICS_TOKEN=TOKEN)
def test_metrics_answers_get_only(client):
    response = client.post("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 405
