"""`make run`'s engine: the embedded product starts with nothing but Python, serves the demo
deployment from a replica on its own worker, sees drift, and stops cleanly."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

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


# Rows unlike the sample's customers (older, spending far more, all on one plan and region).
SHIFTED = {
    "age": 95,
    "monthly_spend": 900.0,
    "tenure_months": 1,
    "support_calls": 12,
    "plan": "premium",
    "region": "west",
}
# A key with the predict scope for the demo organization's owner; prints only the token.
MINT_KEY = """
from tenants.actors import Actor
from tenants.models import Organization, User
from tenants.services import api_key_create
_, token = api_key_create(
    organization=Organization.objects.get(slug="demo-lab"), name="embedded test",
    scopes=["predict"], actor=Actor(user=User.objects.get(email="owner@demo.local")))
print("TOKEN", token)
"""
LOOP_STATE = """
import json
from serving.models import DriftReport, LoopEvent
print("STATE", json.dumps({
    "drifted": DriftReport.objects.filter(deployment__name="churn", drifted=True).exists(),
    "timeline": sorted(set(LoopEvent.objects.values_list("kind", flat=True))),
}))
"""


def _predict(port: int, token: str, inputs: list[dict]):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/orgs/demo-lab/deployments/churn/predict/",
        data=json.dumps({"inputs": inputs}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310  loopback
            return json.loads(response.read())
    except OSError:  # 503 while the replica starts, or the web not up yet
        return None


def _shell(manage: list[str], env: dict, code: str, marker: str) -> str:
    result = subprocess.run(
        [*manage, "shell", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if line.startswith(marker))[
        len(marker) + 1 :
    ]


# Three processes, a replica with torch and the seeding (a sample model is trained) take about a
# minute on an idle machine: alone, after the parallel part.
@pytest.mark.serial
def test_embedded_product_serves_and_ctrl_c_leaves_no_process_behind(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL"}
    }
    env.update(
        DJANGO_SETTINGS_MODULE="factory_saas.settings.embedded",
        VAR_DIR=str(tmp_path),
        # The serving tasks on beat at test speed; their embedded defaults are minutes.
        DRIFT_CHECK_EVERY_S="1",
        DRIFT_SETTLE_S="0",
        SERVING_LOOP_TICK_S="1",
        SERVING_RECONCILE_S="1",
    )
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
    loop = subprocess.run([*manage, "seed_loop"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert loop.returncode == 0, loop.stderr
    assert "deployment churn serving customers-churn v1" in loop.stdout
    token = _shell(manage, env, MINT_KEY, "TOKEN")

    port = _free_port()
    log = (tmp_path / "product.log").open("wb")
    product = subprocess.Popen(
        [*manage, "run_embedded", "--bind", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
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
        # The replica min_replicas asks for starts on the embedded worker and answers.
        answer = wait_for(
            lambda: _predict(port, token, [SHIFTED]),
            timeout=90,
            every=1,
            what="the demo deployment to answer a prediction",
        )
        assert answer["model_version"]["name"] == "customers-churn"
        assert set(answer["predictions"][0]["output"]["probabilities"]) == {"0", "1"}
        # A window's worth of shifted inputs: beat's drift check reports it on SQLite, and the
        # loop's tick submits the retrain the policy asks for (a training job on the worker,
        # which Ctrl-C must stop too).
        for _ in range(2):  # 100 inputs is the most one request carries
            assert _predict(port, token, [SHIFTED] * 100) is not None
        state = wait_for(
            lambda: (
                (found := json.loads(_shell(manage, env, LOOP_STATE, "STATE")))["drifted"]
                and "retrain_submitted" in found["timeline"]
                and found
            ),
            timeout=60,
            every=1,
            what="drift to be reported and the policy's retrain submitted",
        )
        assert {"replica_started", "drift_detected"} <= set(state["timeline"])
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
