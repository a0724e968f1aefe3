import pytest
from django.test import override_settings

from factory_saas.celery import app as celery_app

pytestmark = pytest.mark.django_db


def test_healthz_answers_while_the_process_lives(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_checks_database_and_broker(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_readyz_is_503_naming_an_unreachable_broker_without_its_error(client, monkeypatch, caplog):
    # Port 9 (discard) on loopback has no Redis: the connection is refused at once.
    monkeypatch.setattr(celery_app.conf, "broker_url", "redis://127.0.0.1:9/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    # Anyone may call the probe: it says which check failed, never the error, host or port.
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": "ok", "broker": "unavailable"},
    }
    text = response.content.decode()
    assert "127.0.0.1" not in text and "Error" not in text and "9" not in text
    # The operator finds the detail in the log.
    [record] = [r for r in caplog.records if r.name == "factory_saas.health"]
    assert record.levelname == "WARNING" and "broker" in record.getMessage()
    assert record.exc_info is not None and "refused" in caplog.text.lower()


@override_settings(DEBUG=False)
def test_security_headers_are_set(client):
    response = client.get("/healthz")
    assert "script-src 'self'" in response["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
    assert response["X-Frame-Options"] == "DENY"
    assert response["X-Content-Type-Options"] == "nosniff"
