"""How the worker starts a job's child: its work folder, its environment, its process.

No Django here: the worker and the child both import it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

CHILD_COMMAND = (sys.executable, "-m", "jobs.runner.child")

# What a job's child may see of this process's environment: never the database, storage or
# Stripe credentials, since it parses tenant data.
CHILD_ENV_NAMES = {"PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV"}
CHILD_ENV_PREFIXES = ("CUDA_", "NCCL_", "NVIDIA_", "OMP_", "MKL_", "TORCH_", "OPENBLAS_")


def child_environment() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES)
    }


def attempt_folder_create(*, root: Path, job_id: int, attempt: int) -> Path:
    workdir = root / f"job-{job_id}-attempt-{attempt}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    return workdir


def child_start(
    *,
    workdir: Path,
    cuda_visible_devices: str,
    threads: int,
    command: Sequence[str] = CHILD_COMMAND,
) -> subprocess.Popen:
    """Start the child in `workdir` with its GPUs and its share of the machine's threads."""
    env = child_environment()
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(threads),
        CUDA_VISIBLE_DEVICES=cuda_visible_devices,
    )
    return subprocess.Popen(
        [*command, str(workdir)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",  # native libraries may print bytes that are not UTF-8
        bufsize=1,
        start_new_session=True,  # its own group, so stopping it stops its DDP ranks too
    )
