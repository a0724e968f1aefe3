"""What turns a Celery worker into a pool machine: registration, heartbeats, orphan-proofing,
and privacy from the job children it starts."""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from celery.signals import worker_process_init
from django.conf import settings
from django.db import close_old_connections

from jobs.runner.code import WarmSandbox
from jobs.runner.isolation import child_threads, die_with_parent, keep_private
from jobs.runner.sandbox import python_runtime, runtime_refusal, sandbox_unavailable_reason
from jobs.runner.warm import warm_children_keep
from jobs.runtimes import runtimes_configured

logger = logging.getLogger(__name__)


@worker_process_init.connect
def _pool_process_setup(**kwargs) -> None:
    die_with_parent()
    # Forked pool processes inherit this from run_worker; a worker started otherwise gets it here.
    keep_private()
    # A pool machine's (run_worker names its slots): its next job's child, warm before the job.
    slots = os.environ.get("FACTORY_WORKER_SLOTS")
    if slots and settings.WORKER_WARM_CHILDREN:
        threads = child_threads(int(slots))
        warm_children_keep(threads=threads, sandbox=warm_sandbox_starter(threads=threads))


def warm_sandbox_starter(*, threads: int) -> Callable[[], WarmSandbox] | None:
    """What starts this worker's own-code sandboxes ahead of their jobs: for its default runtime
    (the first of WORKER_RUNTIMES), on a CPU worker (a GPU worker's jobs all start cold: see
    code.WarmSandbox.fits), when it has a runtime the sandbox's user can read and the machine
    can build sandboxes; else None, and own code starts cold (saying why if it cannot)."""
    from jobs.models import Worker

    worker_id = os.environ.get("FACTORY_WORKER_ID")
    configured = runtimes_configured()
    if (
        not worker_id
        or not configured
        or not configured[0][1]
        or not Worker.objects.filter(pk=worker_id, resource_class__name="cpu").exists()
        or sandbox_unavailable_reason() is not None
    ):
        return None
    try:
        runtime = python_runtime(configured[0][1])
    except (OSError, ValueError, subprocess.SubprocessError):
        return None  # a broken runtime: its probe reports it, and its jobs are refused
    if runtime_refusal(runtime) is not None:
        return None
    return functools.partial(
        WarmSandbox, runtime=runtime, root=Path(settings.WORKER_WORKDIR), threads=threads
    )


def detect_devices() -> list[dict]:
    """The GPUs torch sees, asked in a child process so this one never imports torch."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from jobs.runner.devices import detect_gpus; "
            "print(json.dumps(detect_gpus()))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def heartbeat_forever(worker_id: int, stop: threading.Event) -> None:
    from jobs.services.pool import worker_heartbeat

    while not stop.wait(settings.WORKER_HEARTBEAT_S):
        try:
            worker_heartbeat(worker_id=worker_id)
        except Exception:  # a database blip must not end the heartbeat; the next beat retries
            logger.exception("heartbeat failed")
        finally:
            close_old_connections()


def default_name() -> str:
    return settings.WORKER_NAME or socket.gethostname()
