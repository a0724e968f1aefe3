"""Run web, one pool worker and beat together in the foreground; Ctrl-C stops all of them."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand

STOP_GRACE_S = 10


class Command(BaseCommand):
    help = "Start the whole product on the embedded settings (make run)."

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="127.0.0.1:8000")

    def handle(self, *args, bind, **options):
        for folder in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
            path = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get(folder)
            if path:
                Path(path).mkdir(parents=True, exist_ok=True)
        beat_schedule = getattr(settings, "CELERY_BEAT_SCHEDULE_FILENAME", "celerybeat-schedule")
        python = sys.executable
        commands = {
            "web": [python, "manage.py", "runserver", bind, "--noreload"],
            # One pool machine with CPU slots that also runs the scheduler tick.
            "worker": [
                python,
                "manage.py",
                "run_worker",
                "--name",
                "embedded",
                "--with-default-queue",
            ],
            "beat": [
                python,
                "-m",
                "celery",
                "-A",
                "factory_saas",
                "beat",
                "-l",
                "info",
                "-s",
                beat_schedule,
            ],
        }
        stopping = False

        def request_stop(signum, frame):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        # Each child leads its own process group, so stopping it also stops what it forked
        # (runserver's threads, the worker's pool processes).
        children = {
            name: subprocess.Popen(command, start_new_session=True, env=os.environ.copy())
            for name, command in commands.items()
        }
        exit_code = 0
        try:
            while not stopping:
                for name, child in children.items():
                    if child.poll() is not None:
                        self.stderr.write(
                            f"{name} exited with {child.returncode}; stopping the rest."
                        )
                        exit_code, stopping = 1, True
                        break
                time.sleep(0.5)
        finally:
            self._stop(children)
        self.stdout.write("Stopped web, worker and beat.")
        sys.exit(exit_code)

    def _stop(self, children: dict[str, subprocess.Popen]) -> None:
        # SIGTERM to each leader lets it shut down its own helpers (the worker a warm shutdown);
        # whatever is left after the grace period is killed with its whole group.
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
        for child in children.values():
            self._signal_group(child, signal.SIGKILL)
            child.wait()

    @staticmethod
    def _signal_group(child: subprocess.Popen, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)
