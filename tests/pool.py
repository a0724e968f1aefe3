"""A pool of real processes for end-to-end tests: beat, a default-queue worker and pool workers
(each its own machine), on the test database, Redis and local storage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from tests.processes import wait_for

ROOT = Path(__file__).resolve().parents[1]

TIMINGS = {
    "WORKER_HEARTBEAT_S": "0.5",
    "WORKER_OFFLINE_AFTER_S": "5",
    "JOB_CHECKPOINT_EVERY_S": "0.5",
    "JOB_STOP_GRACE_S": "3",
    "SCHEDULER_TICK_S": "0.5",
    "WORKER_CPU_SLOTS": "1",
}


def database_url() -> str:
    """The test database as a URL, for processes a test starts."""
    db = settings.DATABASES["default"]
    auth = db["USER"] + (f":{db['PASSWORD']}" if db.get("PASSWORD") else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class Pool:
    """Worker processes (each its own machine), plus one beat and one default-queue worker."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        # The settings already resolved the xdist worker's Redis database and folders; without
        # the worker's name the processes take them as given instead of shifting them again.
        inherited = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
        self.env = {
            **inherited,
            **TIMINGS,
            "DJANGO_SETTINGS_MODULE": "factory_saas.settings.test",
            "DATABASE_URL": database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "STORAGE_BACKEND": "local",
            "STORAGE_LOCAL_ROOT": str(tmp_path / "storage"),
            "WORKER_WORKDIR": str(tmp_path / "work"),
            # Job children start in "/", so without this they would import whichever checkout
            # the environment installed, not the one under test.
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(ROOT), inherited.get("PYTHONPATH", "")])
            ),
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.suffix = uuid.uuid4().hex[:6]

    def _start(
        self, label: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = (self.tmp / f"{label}.log").open("a")  # a restarted process adds to its log
        process = subprocess.Popen(
            args,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[label] = process
        return process

    def start_control_plane(self, env: dict[str, str] | None = None, concurrency: int = 1) -> None:
        """Beat and the default-queue worker (`concurrency` pool processes, `env` on top of the
        pool's for that worker)."""
        python = sys.executable
        self._start(
            "beat",
            [
                python,
                "-m",
                "celery",
                "-A",
                "factory_saas",
                "beat",
                "-l",
                "warning",
                "-s",
                str(self.tmp / "beat-schedule"),
            ],
        )
        self._start(
            "default",
            [
                python,
                "-m",
                "celery",
                "-A",
                "factory_saas",
                "worker",
                "-Q",
                "default",
                "-c",
                str(concurrency),
                "-l",
                "warning",
                "-n",
                f"default-{self.suffix}@%h",
            ],
            env,
        )

    def start_worker(self, label: str, env: dict[str, str] | None = None) -> str:
        """Start a worker process (with `env` on top of the pool's) and wait for it to register;
        returns its registered name."""
        (name,) = self.start_workers(label, env=env)
        return name

    def start_workers(self, *labels: str, env: dict[str, str] | None = None) -> dict[str, str]:
        """Start a worker process per label at once, then wait for each to register; returns
        {registered name: label}. Started together, their start-ups overlap instead of adding
        up."""
        names = {f"{label}-{self.suffix}": label for label in labels}
        for name, label in names.items():
            self._start(label, [sys.executable, "manage.py", "run_worker", "--name", name], env)
        from jobs.models import Worker

        try:
            for name in names:
                wait_for(
                    lambda name=name: Worker.objects.filter(name=name).exists(),
                    timeout=90,
                    what=f"worker {name} to register",
                )
        except AssertionError:
            print(self.logs())
            raise
        return names

    def kill(self, label: str) -> None:
        """SIGKILL the worker's main process only, as when its machine dies."""
        self.processes[label].send_signal(signal.SIGKILL)
        self.processes[label].wait()

    def stop(self, *, graceful: bool = True) -> None:
        """SIGTERM every process group (the workers' warm shutdown: in-flight tasks finish),
        SIGKILL after 15 s; with graceful=False, SIGKILL at once: a test's teardown, where
        nothing is checked after, need not wait seconds for each worker's shutdown."""
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM if graceful else signal.SIGKILL)
        for process in self.processes.values():
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log"))
        )


@pytest.fixture
def pool(tmp_path):
    pool = Pool(tmp_path)
    with override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(tmp_path / "storage")):
        try:
            pool.start_control_plane()
            yield pool
        finally:
            pool.stop(graceful=False)
