"""`make run`'s engine: the embedded product starts with nothing but Python and stops cleanly."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _ready(url: str):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310  a loopback http URL
            return response.status == 200
    except OSError:
        return False


def _descendants(pid: int) -> set[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True)
    children: dict[int, list[int]] = {}
    for line in ps.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True)
    running = {
        int(pid)
        for pid, stat in (line.split() for line in ps.stdout.splitlines())
        if stat[0] != "Z"
    }
    return pids & running


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
        _wait_until(lambda: _ready(f"http://127.0.0.1:{port}/readyz"), 60, "/readyz to answer 200")
        # web, beat, the worker and its two pool processes
        started = _wait_until(
            lambda: (found := _descendants(product.pid)) and len(found) >= 5 and found,
            30,
            "the worker's pool to start",
        )
        product.send_signal(signal.SIGINT)
        assert product.wait(timeout=30) == 0
        _wait_until(lambda: not _alive(started), 15, "every child to exit")
    finally:
        if product.poll() is None:
            os.killpg(product.pid, signal.SIGKILL)
