"""A Redis server of the test's own, on a free loopback port, that the test may stop and start."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import redis
from django.test import override_settings

from factory_saas.celery import app as celery_app
from tests.processes import wait_for

REDIS_SERVER = "/usr/bin/redis-server"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """No persistence (`--save ''`, no AOF): a restart loses every queued Celery message, the
    harsher case, which the pool must survive because PostgreSQL, not the broker, holds its
    state (a placement whose run message is lost lets its lease lapse and is placed again)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self._answers, timeout=15, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def celery_broker(url: str):
    """Point this process's Celery app (`tick_soon` after a submit) at `url`, then back.

    The app's connection and producer pools are kept aside and put back; the test's own are
    left to the garbage collector (kombu keeps pools per URL, and this URL is never used again).
    """
    saved = (celery_app.conf.broker_url, celery_app._pool, celery_app.amqp._producer_pool)
    celery_app.conf.broker_url = url
    celery_app._pool = celery_app.amqp._producer_pool = None
    try:
        yield
    finally:
        celery_app.conf.broker_url, celery_app._pool, celery_app.amqp._producer_pool = saved


@pytest.fixture
def broker_down(tmp_path):
    """A broker of the test's own, stopped, that this process (web and Celery sends) uses;
    `.start()` brings it back."""
    broker = RedisServer(tmp_path)
    broker.start()
    broker.stop()
    with (
        celery_broker(broker.url),
        override_settings(REDIS_URL=broker.url, CELERY_BROKER_URL=broker.url),
    ):
        yield broker
    broker.stop()
