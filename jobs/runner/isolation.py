"""How the worker starts a job's child, how the child moves into its folder, and how the worker
reads what the child wrote there: a work folder nobody else can find or read, an environment
without the platform's secrets, processes that other processes of the same user cannot read
through /proc, and files read only as the regular files they are inside that folder.

The child runs as the worker's own user until the sandbox gives it one of its own, so each step
is defence in depth; docs/reliability.md says what stays open. No Django here: the worker and the
child both import this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from jobs.runner.zygote import ForkedChild, Zygote

    ChildProcess = subprocess.Popen | ForkedChild

CHILD_COMMAND = (sys.executable, "-m", "jobs.runner.child")
# The child's first line: it is private now (and, when started ahead of its job, has imported
# what a job needs), so it may be told where its folder is.
READY = "@@ready"
PR_SET_DUMPABLE = 4  # from <linux/prctl.h>
PR_SET_PDEATHSIG = 1

# What a job's child may see of the worker's environment: what torch and the numeric libraries
# read, never the database, broker, storage or Stripe credentials, since it parses tenant data.
# HOME and TMPDIR are the child's own, inside its folder (`attempt_enter`).
CHILD_ENV_NAMES = {"PATH", "PYTHONPATH", "LANG", "LC_ALL", "VIRTUAL_ENV"}
CHILD_ENV_PREFIXES = ("CUDA_", "NCCL_", "NVIDIA_", "OMP_", "MKL_", "TORCH_", "OPENBLAS_")


def keep_private() -> None:
    """Make this process non-dumpable, so that another process of the same user (a job's child)
    can no longer read its /proc environ, memory, open files or working directory.

    execve makes a process dumpable again, so each process that holds secrets or tenant data
    calls this itself: the worker, its pool processes, every job child and rank.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_DUMPABLE) failed with errno {errno}")


def die_with_parent() -> None:
    """Have Linux SIGKILL this process when the thread that started it exits, so that no
    orphan keeps a GPU busy after its worker died."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed with errno {errno}")


def child_threads(slots: int) -> int:
    """The threads a job's child gets on a machine of `slots`: children share the machine's
    cores, a slot's share each, so that they do not oversubscribe them."""
    return max(1, (os.cpu_count() or 1) // max(1, slots))


def child_environment(*, threads: int, cuda_visible_devices: str) -> dict[str, str]:
    """A job child's environment: the allowed part of the worker's, unbuffered output, its
    thread count and its GPUs."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES)
    }
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(threads),
        CUDA_VISIBLE_DEVICES=cuda_visible_devices,
    )
    return env


def _work_root_prepare(root: Path) -> None:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if root.stat().st_uid == os.geteuid():
        # Ours: no other user lists or enters it. Only a root that another user owns (the
        # image's, mode 1733) keeps the worker's own user, and so its children, from listing it.
        root.chmod(0o700)


def attempt_folder_create(*, root: Path, job_id: int, attempt: int) -> Path:
    """A new folder for one attempt, for its owner only, under a name nobody can guess: a child
    finds another attempt's folder neither by naming it nor, under a root another user owns, by
    listing the root."""
    return _private_folder_create(root, f"job-{job_id}-attempt-{attempt}")


def staging_folder_create(*, root: Path) -> Path:
    """As attempt_folder_create, for a sandbox started before its job is known: the job's
    folder, bound into it ahead and filled by the worker once the job arrives."""
    return _private_folder_create(root, "staged")


def _private_folder_create(root: Path, prefix: str) -> Path:
    keep_private()  # the worker's open files in the folder must not show in its /proc
    _work_root_prepare(root)
    workdir = root / f"{prefix}-{secrets.token_hex(16)}"
    workdir.mkdir(mode=0o700)
    workdir.chmod(0o700)  # whatever the umask
    for private in ("home", "tmp"):
        (workdir / private).mkdir(mode=0o700)
    return workdir


class WaitingChild:
    """A job's child, started before it is told its job: private to the other processes of its
    user, without a GPU, in its own process group, and waiting to read on stdin which folder and
    GPUs are its job's (`hand_over`). Each serves one job.

    Until then nothing it shows in /proc names the folder: its command line, working directory
    and environment do not, and the path reaches its stdin only after its READY line.
    """

    def __init__(
        self,
        *,
        threads: int,
        command: Sequence[str] = CHILD_COMMAND,
        cuda_visible_devices: str = "",
        zygote: Zygote | None = None,
    ):
        """Start `command`, or, given a `zygote` (started with `threads`), have it fork the
        child (zygote.ZygoteError if it cannot)."""
        keep_private()
        self.threads = threads
        handover_read, self._handover = os.pipe()
        try:
            if zygote is not None:
                self.process = zygote.fork(stdin=handover_read)
            else:
                self.process = _child_popen(command, threads, cuda_visible_devices, handover_read)
        except BaseException:
            os.close(self._handover)
            raise
        finally:
            os.close(handover_read)

    def hand_over(self, *, workdir: Path, cuda_visible_devices: str) -> ChildProcess:
        """Once the child says READY, tell it its folder and GPUs; returns the child.

        A child that dies before READY says why on stderr; the caller reads that as its failure.
        """
        handover = json.dumps(
            {"workdir": str(workdir), "cuda_visible_devices": cuda_visible_devices}
        )
        with contextlib.suppress(BrokenPipeError), open(self._handover, "w") as pipe:
            if self.process.stdout.readline().rstrip("\n") == READY:
                pipe.write(f"{handover}\n")
        return self.process

    def for_job(
        self, *, workdir: Path, cuda_visible_devices: str
    ) -> tuple[ChildProcess, Callable[[], ChildProcess]]:
        """The child, and what hands it this job's folder and GPUs (`hand_over`): a child still
        importing says READY later, so its supervisor calls that from another thread."""
        return self.process, functools.partial(
            self.hand_over, workdir=workdir, cuda_visible_devices=cuda_visible_devices
        )

    def discard(self) -> None:
        """End a child that was never handed a job."""
        with contextlib.suppress(OSError):
            os.close(self._handover)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        self.process.communicate()


def _child_popen(
    command: Sequence[str], threads: int, cuda_visible_devices: str, stdin: int
) -> subprocess.Popen:
    return subprocess.Popen(
        list(command),
        cwd="/",
        env=child_environment(threads=threads, cuda_visible_devices=cuda_visible_devices),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",  # native libraries may print bytes that are not UTF-8
        bufsize=1,
        start_new_session=True,  # its own group, so stopping it stops its DDP ranks too
    )


def child_start(
    *,
    workdir: Path,
    cuda_visible_devices: str,
    threads: int,
    command: Sequence[str] = CHILD_COMMAND,
) -> tuple[subprocess.Popen, Callable[[], subprocess.Popen]]:
    """Start the child with its GPUs and its share of the machine's threads, and return it with
    its hand-over of `workdir` (WaitingChild.for_job). Call it from the thread that will
    supervise the child, since the child dies with the thread that started it."""
    waiting = WaitingChild(
        threads=threads, command=command, cuda_visible_devices=cuda_visible_devices
    )
    return waiting.for_job(workdir=workdir, cuda_visible_devices=cuda_visible_devices)


def attempt_enter() -> Path:
    """The child's side of `WaitingChild`: become private, say READY, read its folder and GPUs
    and move in, with HOME and TMPDIR there too, so that nothing it writes lands where another
    attempt could read it."""
    keep_private()
    print(READY, flush=True)
    line = sys.stdin.readline()
    if not line.strip():
        raise RuntimeError("The worker named no working directory on stdin.")
    handover = json.loads(line)
    workdir = Path(handover["workdir"])
    # Read by CUDA when it starts, which a waiting child's imports do not do.
    os.environ["CUDA_VISIBLE_DEVICES"] = handover["cuda_visible_devices"]
    os.chdir(workdir)
    os.environ.update(HOME=str(workdir / "home"), TMPDIR=str(workdir / "tmp"))
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    return workdir


class ChildFileRefused(Exception):
    """A path the child named is not a regular file inside its folder; the attempt fails with
    this reason."""


# Each component opened on its own, never through a link: the parent reads as the worker, so a
# link (or a folder on the way replaced by one) would hand the job any file the worker can read.
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO the child made must not wait for a writer that never comes.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@contextlib.contextmanager
def child_file_open(workdir: Path, relative: str, *, remove: bool = False) -> Iterator[BinaryIO]:
    """Open, for reading, a file the child named relative to its folder (a checkpoint, a result
    artifact), following no link in any component; ChildFileRefused unless it is a regular file.

    With `remove` the file is deleted once read, also through the folder that was checked, so a
    swapped folder cannot make the worker delete a file elsewhere.
    """
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise ChildFileRefused(f"The job named {relative!r}, which is not a file in its folder.")
    folder = os.open(workdir, _DIRECTORY_FLAGS)
    try:
        for depth, part in enumerate(parts[:-1]):
            try:
                inner = os.open(part, _DIRECTORY_FLAGS, dir_fd=folder)
            except OSError as exc:
                raise _refusal("/".join(parts[: depth + 1]), part, folder, exc) from exc
            os.close(folder)
            folder = inner
        shown = "/".join(parts)
        try:
            descriptor = os.open(parts[-1], _FILE_FLAGS, dir_fd=folder)
        except OSError as exc:
            raise _refusal(shown, parts[-1], folder, exc) from exc
        kind = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(kind):
            os.close(descriptor)
            raise ChildFileRefused(
                f"The job wrote {shown} as {_kind_name(kind)}; only regular files are read."
            )
        os.set_blocking(descriptor, True)
        try:
            with open(descriptor, "rb") as stream:
                yield stream
        finally:
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(parts[-1], dir_fd=folder)
    finally:
        os.close(folder)


def _refusal(shown: str, name: str, folder: int, error: OSError) -> ChildFileRefused:
    """Why `name`, in the open `folder`, could not be opened, in the job's terms."""
    try:
        kind = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return ChildFileRefused(f"The job named {shown}, which it did not write.")
    if not (stat.S_ISREG(kind) or stat.S_ISDIR(kind)):
        return ChildFileRefused(
            f"The job wrote {shown} as {_kind_name(kind)}; only regular files are read."
        )
    if error.errno == errno.ENOTDIR:
        return ChildFileRefused(f"The job wrote {shown} as a file where its path needs a folder.")
    return ChildFileRefused(f"The job wrote {shown}, which cannot be read: {error.strerror}.")


def _kind_name(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"
