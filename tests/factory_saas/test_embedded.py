"""`make run`'s engine: the embedded product starts with nothing but Python and stops cleanly."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.processes import alive, descendants, wait_for

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ready(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  a loopback http URL
            return response.status == 200
    except OSError:
        return False


def test_embedded_product_serves_and_ctrl_c_leaves_no_process_behind(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"}
    }
    env.update(DJANGO_SETTINGS_MODULE="factory_saas.settings.embedded", VAR_DIR=str(tmp_path))
    manage = [sys.executable, "manage.py"]
    subprocess.run(
        [*manage, "migrate", "--noinput"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    seeded = subprocess.run(
        [*manage, "seed_demo"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert "owner@demo.local" in seeded.stdout
    samples = subprocess.run(
        [*manage, "seed_samples"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert samples.returncode == 0, samples.stderr
    assert all(name in samples.stdout for name in ("customers", "shapes", "reviews", "hourly-load"))

    port = _free_port()
    product = subprocess.Popen(
        [*manage, "run_embedded", "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: _ready(f"http://127.0.0.1:{port}/readyz"),
            timeout=60,
            what="/readyz to answer 200",
        )
        query = (
            "from jobs.models import Worker; print(Worker.objects.filter(name='embedded').exists())"
        )
        registered = [*manage, "shell", "-c", query]

        def worker_registered() -> bool:
            result = subprocess.run(registered, cwd=ROOT, env=env, capture_output=True, text=True)
            return "True" in result.stdout

        wait_for(worker_registered, timeout=60, what="the embedded pool worker to register")
        # web, beat, the worker and its pool processes
        started = wait_for(
            lambda: (found := descendants(product.pid)) and len(found) >= 4 and found,
            timeout=30,
            what="the worker's pool to start",
        )
        product.send_signal(signal.SIGINT)
        assert product.wait(timeout=30) == 0
        wait_for(lambda: not alive(started), timeout=15, what="every child to exit")
    finally:
        # On a failure the children (each in its own session) must not outlive the test.
        for pid in descendants(product.pid) | {product.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        product.wait()
