"""The factory loop on the real stack, stage by stage: drift injected into live traffic until the
retrained version serves 100%, then a second run whose canary is made worse and rolled back.

Starts the pool on this machine (celery beat and a default-queue Celery worker running the
reconciler, the drift check and the loop's tick every 0.5 s; one pool worker with three CPU
slots: the serving replica, a training or evaluate job, a canary's replica) on the PostgreSQL
database `factory_saas_loopbench`, created afresh each run, and Redis db 9, flushed at the start.
Predictions go through the predict API in this process (DRF's test client, no HTTP server in
front: the gateway forwards to the replicas over HTTP). The data and the short periods are those
of tests/serving/test_loop_real_stack.py (tests/serving/loop_stack.py).

    .venv/bin/python -m bench.loop        # one run of each, ~3 min on 2 shared vCPUs

Run 1 (promote), from the moment shifted traffic is sent (t0), stamps read from the database:
  detect_s   t0 -> the drift_detected timeline row
  retrain_s  drift_detected -> the retrain job finished
  gate_s     the retrain job finished -> gate_passed (the evaluate job ran in between)
  rollout_s  gate_passed -> promoted (canary replica cold start, a 1 s bake, its traffic)
  total_s    t0 -> promoted
Run 2 (rollback): a challenger that passes the gate becomes a canary, its replica is stopped
(SIGSTOP) and one request routed to it times out:
  rollback_s the canary's first failed request -> rolled_back

Baseline, from the same run: the floor no loop can beat with these settings, which is the
compute it must wait for (the training and evaluate jobs' own run time, started -> finished, and
the canary replica's cold start) plus the bake. The periodic steps add at most one drift check
and one tick per step (submit, gate submit, gate decide, canary start, promote) on top: the
ceiling of the waiting the loop's own periods cause. A manual loop needs the same compute plus a
person at each of the five steps. The rollback's floor is the failed request's own timeout (1 s);
a tick (0.5 s) may follow it.

The table goes to stdout, ending with one `RESULT {json}` line; progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.e2e import django_fresh, progress

REPO_ROOT = Path(__file__).resolve().parent.parent
DATABASE_URL = os.environ.get(
    "BENCH_LOOP_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/factory_saas_loopbench"
)
REDIS_URL = os.environ.get("BENCH_LOOP_REDIS_URL", "redis://127.0.0.1:6379/9")
BAKE_S = 1
TICK_STEPS = 5  # retrain submit, gate submit, gate decide, canary start, promote
TIMEOUT_S = 300


def wait(condition, what: str):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    with tempfile.TemporaryDirectory(prefix="loop-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = {
            "DJANGO_SETTINGS_MODULE": "factory_saas.settings.test",
            "DATABASE_URL": DATABASE_URL,
            "REDIS_URL": REDIS_URL,
            "CELERY_BROKER_URL": REDIS_URL,
            "STORAGE_BACKEND": "local",
            "STORAGE_LOCAL_ROOT": str(tmp / "storage"),
            "PYTHONPATH": str(REPO_ROOT),
        }
        django_fresh(env, database_url=DATABASE_URL, redis_url=REDIS_URL)
        from tests.pool import Pool
        from tests.serving.loop_stack import LOOP_TIMINGS

        pool = Pool(tmp)
        pool.env.update({**LOOP_TIMINGS, "WORKER_CPU_SLOTS": "3"})
        try:
            pool.start_control_plane()
            pool.start_worker("w1")
            figures = run(pool, tmp)
        except BaseException:
            progress(pool.logs())
            raise
        finally:
            pool.stop()
    report(figures)


def _event(deployment, kind: str, after=None):
    from serving.models import LoopEvent

    rows = LoopEvent.objects.filter(deployment=deployment, kind=kind)
    if after is not None:
        rows = rows.filter(created_at__gt=after)
    return rows.order_by("pk").first()


def run(pool, tmp: Path) -> dict:
    from django.test import override_settings
    from rest_framework.test import APIClient

    from registry.services import dataset_create
    from serving import gateway
    from serving.models import Replica, Retrain, RetrainPolicy
    from tenants.actors import Actor
    from tenants.models import User
    from tenants.scopes import scopes_for_role
    from tenants.services import api_key_create, organization_create
    from tests.serving.loop_stack import (
        LOOP_TIMINGS,
        MIN_SAMPLES,
        WINDOW_ROWS,
        Caller,
        dataset_add,
        deploy,
        inputs_of,
        listening_pid,
        promoted_after_feeding,
        routing_key_to,
        train,
        world,
    )

    def waiting(condition, *, timeout, what):
        return wait(condition, what)

    user = User.objects.create_user(email="loop-bench@example.com")
    actor = Actor(user=user)
    org = organization_create(name="Loop bench", owner=user, actor=actor)
    _key, token = api_key_create(
        organization=org, name="bench", scopes=sorted(scopes_for_role("owner")), actor=actor
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    points = dataset_create(organization=org, name="points", actor=actor)
    v1 = dataset_add(points, world(2000, seed=1), tmp, actor=actor)
    progress("training the champion")
    champion = train(org, v1, actor=actor, wait_for=waiting)
    deployment = deploy(org, champion, actor=actor)
    RetrainPolicy.objects.create(
        organization=org,
        deployment=deployment,
        dataset=points,
        cooldown_s=0,
        gate_margin=0.1,
        canary_percent=50,
        bake_s=BAKE_S,
        rollback_p99_ratio=1000,
        # The canary's requests are sent a few at a time as the loop is polled: a slow machine must
        # not see it paused as inconclusive after the 1 s bake and its default 3 extensions.
        bake_extensions=60,
    )
    caller = Caller(client, deployment, [])
    dataset_add(points, world(2000, seed=2, shifted=True), tmp, actor=actor)
    shifted = inputs_of(world(WINDOW_ROWS, seed=3, shifted=True))
    # DRF's test client calls itself `testserver`, which only the test runner allows.
    with override_settings(SERVING_LOOP_MIN_SAMPLES=MIN_SAMPLES, ALLOWED_HOSTS=["testserver"]):
        progress("waiting for the champion's replica")
        wait(lambda: caller.answered(shifted[:1]), "the champion's replica")

        progress("run 1: shifted traffic")
        t0 = time.time()
        caller.predict(shifted[:100])
        caller.predict(shifted[100:])
        canary = wait(
            lambda: Retrain.objects.filter(deployment=deployment, state="canary").first(),
            "the canary",
        )
        bake = inputs_of(world(40, seed=4, shifted=True))
        wait(lambda: promoted_after_feeding(canary, caller, bake), "the promotion")
        canary.refresh_from_db()
        training, evaluation = canary.job, canary.evaluation_job
        drift = _event(deployment, "drift_detected")
        gate = _event(deployment, "gate_passed")
        started = _event(deployment, "canary_started")
        done = _event(deployment, "promoted")
        ready = (
            Replica.objects.filter(deployment=deployment, model_version=canary.challenger)
            .order_by("pk")
            .first()
        )
        figures = {
            "detect_s": drift.created_at.timestamp() - t0,
            "retrain_s": (training.finished_at - drift.created_at).total_seconds(),
            "gate_s": (gate.created_at - training.finished_at).total_seconds(),
            "rollout_s": (done.created_at - gate.created_at).total_seconds(),
            "total_s": done.created_at.timestamp() - t0,
            "train_run_s": (training.finished_at - training.started_at).total_seconds(),
            "evaluate_run_s": (evaluation.finished_at - evaluation.started_at).total_seconds(),
            "cold_start_s": (ready.ready_at - started.created_at).total_seconds(),
        }
        figures["periods_s"] = float(LOOP_TIMINGS["DRIFT_CHECK_EVERY_S"]) + TICK_STEPS * float(
            LOOP_TIMINGS["SERVING_LOOP_TICK_S"]
        )
        figures["floor_s"] = (
            figures["train_run_s"] + figures["evaluate_run_s"] + figures["cold_start_s"] + BAKE_S
        )

        progress("run 2: old-world traffic, good data, a canary whose replica hangs")
        dataset_add(points, world(2000, seed=7), tmp, actor=actor)
        old_world = inputs_of(world(WINDOW_ROWS, seed=6))
        caller.predict(old_world[:100])
        caller.predict(old_world[100:])
        bad = wait(
            lambda: Retrain.objects.filter(deployment=deployment, state="canary").first(),
            "the second canary",
        )
        replica = wait(
            lambda: (
                Replica.objects.filter(
                    deployment=deployment, model_version=bad.challenger, state="ready"
                )
                .select_related("job")
                .first()
            ),
            "the second canary's replica",
        )
        hung = listening_pid(replica.job.serve_address, pool.processes["w1"].pid)
        os.kill(hung, signal.SIGSTOP)
        try:
            with override_settings(SERVING_FORWARD_TIMEOUT_S=1.0):
                gateway._http = None
                failed_at = time.time()
                caller.predict(
                    old_world[:MIN_SAMPLES], routing_key=routing_key_to(deployment, bad.challenger)
                )
                gateway._http = None
        finally:
            os.kill(hung, signal.SIGCONT)
        rolled = wait(lambda: _event(deployment, "rolled_back"), "the rollback")
        figures["rollback_s"] = rolled.created_at.timestamp() - failed_at
        # The request's own timeout; the next tick may come at once (the bake is over).
        figures["rollback_floor_s"] = 1.0
        figures["statuses"] = sorted(set(caller.statuses))
    return figures


def report(figures: dict) -> None:
    rows = [
        ("detect_s", "shifted traffic -> drift_detected"),
        ("retrain_s", "drift_detected -> retrain job finished"),
        ("gate_s", "retrain job finished -> gate_passed"),
        ("rollout_s", "gate_passed -> promoted (canary, 1 s bake)"),
        ("total_s", "shifted traffic -> new version at 100%"),
        ("rollback_s", "canary's failed request -> rolled_back"),
    ]
    print(f"{'stage':<12} {'seconds':>8}  what")
    for key, what in rows:
        print(f"{key:<12} {figures[key]:>8.2f}  {what}")
    print()
    print("baseline (the floor at these settings, same run):")
    print(f"  training job run (started -> finished)   {figures['train_run_s']:>7.2f} s")
    print(f"  evaluate job run (started -> finished)   {figures['evaluate_run_s']:>7.2f} s")
    print(f"  canary replica cold start                {figures['cold_start_s']:>7.2f} s")
    print(f"  bake                                     {BAKE_S:>7.2f} s")
    print(f"  floor (compute + bake)                   {figures['floor_s']:>7.2f} s")
    print(f"  periods' waiting, at most (check, 5 ticks) {figures['periods_s']:>5.2f} s")
    print(
        f"  loop overhead over the floor: {figures['total_s'] - figures['floor_s']:.2f} s "
        f"({figures['total_s'] / figures['floor_s']:.2f}x)"
    )
    print(f"  rollback floor (the request's 1 s timeout): {figures['rollback_floor_s']:.2f} s")
    print(f"  status codes callers saw: {figures['statuses']}")
    result = {key: round(figures[key], 2) for key, _ in rows}
    print(f"RESULT {json.dumps(result)}")


if __name__ == "__main__":
    main()
