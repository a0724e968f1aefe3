"""Multiprocess mode in real processes: gunicorn's workers and the control plane's Celery pool
processes each record their own metrics, and one scrape of any of them adds up all of theirs."""

import socket
import subprocess
import sys

import httpx
import pytest
from django.conf import settings
from django.test import override_settings

from tests.factories import JobFactory, OrganizationFactory
from tests.ops.scrape import samples, value
from tests.pool import ROOT, Pool, database_url
from tests.processes import wait_for

# Every test here starts processes.
pytestmark = pytest.mark.slow

TOKEN = "scrape-token-0123456789"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=10)
    return response.status_code, response.text


def _answers(url: str):
    def check():
        try:
            return _get(url)
        except httpx.TransportError:
            return None

    return check


def _stale_files(folder):
    """A metrics file an earlier run left behind, unreadable: a scrape that still read it would
    fail, so a scrape that works shows the server emptied the folder when it started."""
    folder.mkdir()
    (folder / "counter_999999.db").write_bytes(b"left by an earlier run")


def test_gunicorn_workers_are_summed_in_one_scrape(tmp_path):
    metrics_dir = tmp_path / "prometheus"
    _stale_files(metrics_dir)
    port = _free_port()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "factory_saas.settings.test",
        # Neither /healthz nor /metrics reads them; this run's own, should that change.
        "DATABASE_URL": database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "METRICS_TOKEN": TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        "python:factory_saas.gunicorn_conf",
        "factory_saas.wsgi:application",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        "2",
    ]
    log = (tmp_path / "gunicorn.log").open("w")
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(_answers(f"{base}/healthz"), timeout=60, what="gunicorn to answer")
        for _ in range(30):
            assert _get(f"{base}/healthz")[0] == 200
        # Both workers served some of them: each wrote its own file.
        wait_for(
            lambda: len(list(metrics_dir.glob("counter_*.db"))) >= 2,
            timeout=10,
            what="both workers' metric files",
        )
        assert _get(f"{base}/metrics")[0] == 401
        for _ in range(4):  # whichever worker answers the scrape, it reads all of them
            status, text = _get(f"{base}/metrics", TOKEN)
            assert status == 200, text
            healthz = value(
                samples(text),
                "django_http_requests_latency_seconds_by_view_method_count",
                method="GET",
                view="healthz",
            )
            assert healthz == 31
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.django_db(transaction=True)
def test_the_control_plane_serves_the_tick_and_the_pool_from_its_worker(tmp_path):
    from jobs.services.pool import worker_register

    metrics_dir = tmp_path / "prometheus"
    _stale_files(metrics_dir)
    port = _free_port()
    pool = Pool(tmp_path)
    # The worker below is a row with no process to heartbeat: the reaper must not take it offline.
    pool.env["WORKER_OFFLINE_AFTER_S"] = "3600"
    organization = OrganizationFactory()
    worker_register(name=f"cpu-metrics-{pool.suffix}", devices=[])  # 2 cpu slots, no process
    for _ in range(3):
        JobFactory(organization=organization)
    base = f"http://127.0.0.1:{port}"
    with override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(tmp_path / "storage")):
        try:
            pool.start_control_plane(
                env={
                    "METRICS_PORT": str(port),
                    "METRICS_TOKEN": TOKEN,
                    "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                },
                concurrency=2,
            )
            wait_for(_answers(f"{base}/healthz"), timeout=90, what="the metrics server")
            assert _get(f"{base}/metrics")[0] == 401
            assert _get(f"{base}/metrics", "wrong")[0] == 401

            def placed():
                status, text = _get(f"{base}/metrics", TOKEN)
                assert status == 200, text
                scraped = samples(text)
                return (
                    value(scraped, "factory_scheduler_placements_total") >= 2
                    and value(scraped, "factory_queue_jobs", resource_class="cpu") == 1
                    and scraped
                )

            try:
                scraped = wait_for(placed, timeout=60, what="beat's ticks to place two jobs")
            except AssertionError:
                print(pool.logs())
                raise
            assert value(scraped, "factory_scheduler_tick_seconds_count") >= 1
            assert value(scraped, "factory_scheduler_ticks_total", outcome="ran") >= 1
            assert value(scraped, "factory_queue_tenant_jobs", organization=organization.slug) == 1
            assert value(scraped, "factory_pool_free_slots", resource_class="cpu") == 0
            assert value(scraped, "factory_pool_read_up") == 1
        finally:
            pool.stop()
