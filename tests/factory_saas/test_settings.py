"""The settings package: production refuses unsafe starts and passes `check --deploy`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every test here starts processes.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_ENV = {
    "DJANGO_SETTINGS_MODULE": "factory_saas.settings.production",
    "SECRET_KEY": "a-real-looking-secret-key-for-this-test-0123456789-abcdefghijklmnopq",
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/factory_saas",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "ALLOWED_HOSTS": "factory.example.com",
}


def _manage(*args, **env):
    base = {k: v for k, v in os.environ.items() if k not in PRODUCTION_ENV and k != "DEBUG"}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_on_production_settings():
    result = _manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION_ENV)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_production_refuses_to_start_without_a_secret_key():
    env = {**PRODUCTION_ENV, "SECRET_KEY": ""}
    result = _manage("check", **env)
    assert result.returncode != 0 and "SECRET_KEY must be set" in result.stderr


def _example_secret_key() -> str:
    for line in (ROOT / "docker" / "env.example").read_text().splitlines():
        if line.startswith("SECRET_KEY="):
            return line.removeprefix("SECRET_KEY=")
    raise AssertionError("docker/env.example has no SECRET_KEY line")


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(_example_secret_key(), id="the public example"),
        pytest.param("short-but-random-Xq3vT9pL2mN8", id="under 50 characters"),
        pytest.param("ab" * 30, id="too few distinct characters"),
        pytest.param("django-insecure-" + "k3Jx9QmT2vLp8WzR4nYb7HcD5fGs1aEu6oIy0", id="insecure"),
    ],
)
def test_production_refuses_a_public_or_weak_secret_key(key):
    result = _manage("check", **{**PRODUCTION_ENV, "SECRET_KEY": key})
    assert result.returncode != 0, result.stdout
    assert "ImproperlyConfigured" in result.stderr and "SECRET_KEY" in result.stderr
    assert key not in result.stderr  # the refusal does not print the key it refused


def test_production_refuses_the_public_example_as_an_old_key_too():
    env = {**PRODUCTION_ENV, "SECRET_KEY_FALLBACKS": _example_secret_key()}
    result = _manage("check", **env)
    assert result.returncode != 0 and "SECRET_KEY_FALLBACKS[0] is the published" in result.stderr


def test_one_setting_gives_every_reader_the_trusted_proxy_count():
    code = (
        "from django.conf import settings; "
        "print(settings.TRUSTED_PROXY_COUNT, settings.ALLAUTH_TRUSTED_PROXY_COUNT, "
        "settings.REST_FRAMEWORK['NUM_PROXIES'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **PRODUCTION_ENV, "TRUSTED_PROXY_COUNT": "2"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2", "2"]


def test_production_refuses_to_start_with_debug_on():
    result = _manage("check", **PRODUCTION_ENV, DEBUG="true")
    assert result.returncode != 0 and "DEBUG must be off" in result.stderr


def test_django_setup_does_not_import_torch():
    code = (
        "import sys, django; django.setup(); "
        "import factory_saas.urls; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "factory_saas.settings.test"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


_SCRAPE = (
    "from django.test import Client; "
    "r = Client().get('/metrics', HTTP_HOST='{host}', HTTP_AUTHORIZATION='{authorization}'); "
    "print('STATUS', r.status_code)"
)


def _production_scrape(host: str, authorization: str, **env) -> str:
    result = _manage(
        "shell",
        "-c",
        _SCRAPE.format(host=host, authorization=authorization),
        **PRODUCTION_ENV,
        **env,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split("STATUS")[-1].strip()


def test_production_refuses_every_scrape_without_a_metrics_token():
    """Never open by default: no METRICS_TOKEN, no metrics, even for an empty bearer token."""
    assert _production_scrape("factory.example.com", "Bearer ") == "403"


def test_prometheus_scrapes_a_pod_by_its_address_over_plain_http_with_the_token():
    """Inside the cluster Prometheus sends the pod's address as Host and no TLS: the pod's
    address is an allowed host and /metrics is not redirected to HTTPS."""
    token = "scrape-token-0123456789"
    env = {"POD_IP": "10.1.2.3", "METRICS_TOKEN": token}
    assert _production_scrape("10.1.2.3:8000", f"Bearer {token}", **env) == "200"
    assert _production_scrape("10.1.2.3:8000", "Bearer wrong", **env) == "401"
    assert _production_scrape("10.9.9.9:8000", f"Bearer {token}", **env) == "400"
