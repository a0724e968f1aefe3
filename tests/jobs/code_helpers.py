"""What the tests of own code on the real stack share: a pool whose workers run packages in a
real bubblewrap sandbox, the runtime they offer, and waiting for a job's end."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

import pytest

from jobs.models import TERMINAL_STATES, Job
from jobs.runner import sandbox
from jobs.runner.sandbox import python_runtime, runtime_refusal, sandbox_unavailable_reason
from tests.processes import wait_for

RUNTIME = "torch-2.13-py311"


def archive(files: dict[str, str]) -> bytes:
    """A package as a tar.gz of `files` (path -> text, dedented)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for path, text in files.items():
            data = textwrap.dedent(text).encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def runtime_python() -> str:
    """This interpreter when the sandbox's user can read it, else the system's Python (the
    packages here need only the standard library)."""
    usable = runtime_refusal(python_runtime(sys.executable)) is None
    return sys.executable if usable else "/usr/bin/python3"


@contextlib.contextmanager
def sandbox_work_root():
    """A work root the sandbox's user may pass through but not list (as the image lays it out),
    removed afterwards; fails the test on a machine that cannot build sandboxes."""
    reason = sandbox_unavailable_reason()
    if reason is not None:
        pytest.fail(reason)
    root = Path(tempfile.mkdtemp(prefix="code-jobs-", dir="/tmp"))
    root.chmod(0o755)
    work = root / "work"
    work.mkdir(mode=0o1733)
    work.chmod(0o1733)
    if os.geteuid() == 0:
        os.chown(work, sandbox.SANDBOX_UID, sandbox.SANDBOX_GID)
    try:
        yield work
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sandboxed_pool(pool):
    """The pool's workers set up to run code packages: a work root for sandboxes and a runtime
    the sandbox's user can read."""
    with sandbox_work_root() as work:
        pool.env["WORKER_WORKDIR"] = str(work)
        pool.env["WORKER_RUNTIMES"] = f"{RUNTIME}={runtime_python()}"
        yield pool


def finished(job: Job, pool, timeout: float = 120) -> Job:
    try:
        wait_for(
            lambda: Job.objects.get(pk=job.pk).state in TERMINAL_STATES,
            timeout=timeout,
            what=f"job {job.pk} to finish",
        )
    except AssertionError:
        print(pool.logs())
        raise
    job.refresh_from_db()
    return job
