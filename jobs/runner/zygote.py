"""The zygote a worker's pool process forks its warm job children from, so that each child does
not import torch and the recipes again (seconds of CPU a job; docs/benchmarks.md).

`python -m jobs.runner.zygote <entry module> <control fd> <threads>` imports what the entry
module's `zygote_warm_up()` imports, with one thread, then, for each request on its control
socket, forks a child that runs `entry.main(["--warm"])` with OMP_NUM_THREADS=<threads>: a warm
child (isolation.WaitingChild) as one started by its own interpreter would be. The zygote never
reads a job's spec, data or folder, so a child starts with nothing of any tenant's: the same as
a fresh interpreter.

The pool process sees a forked child as the subprocess.Popen a started one is (ForkedChild): its
pipes are the pool process's, sent with the request; the zygote reaps it and writes its exit
status to a pipe of its own; signals go through a pidfd, so they never reach a process that
took a reaped child's pid. Each child is in its own session (its group: what stopping a job
signals), private, and dies with the zygote, which dies with the thread that started it.

A process with more than one thread cannot fork safely (another thread may hold a lock the
child would wait on forever): the zygote refuses then, and the worker starts its children as
before. No Django here, as in isolation.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import NoReturn

from jobs.runner.isolation import child_environment, die_with_parent, keep_private


def zygote_command(entry: str) -> tuple[str, ...]:
    """The command of a zygote whose children run the module `entry` (see above)."""
    return (sys.executable, "-m", "jobs.runner.zygote", entry)


ZYGOTE_COMMAND = zygote_command("jobs.runner.child")
READY = b"ready"
FORK = b"fork"
# What a fork request hands over: the child's stdin, stdout and stderr, and its status pipe.
FORK_FDS = 4
MESSAGE_BYTES = 1024


class ZygoteError(Exception):
    """The zygote is gone, or refused to fork; the caller starts its child otherwise."""


class Zygote:
    """The pool process's side: starts the zygote, asks it for children."""

    def __init__(self, *, threads: int, command: Sequence[str] = ZYGOTE_COMMAND):
        keep_private()
        # One thread while it imports: torch starts its others at import when told more, and a
        # process with two threads cannot fork safely. Each child is told `threads`.
        env = child_environment(threads=1, cuda_visible_devices="")
        self.threads = threads
        self._ready = False
        # Why it cannot fork safely, once it said so (see main): a new one could not either.
        self.refusal: str | None = None
        self._control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [*command, str(theirs.fileno()), str(threads)],
                cwd="/",
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # signals to a job's group never reach it
            )
        except BaseException:
            self._control.close()
            raise
        finally:
            theirs.close()

    def alive(self) -> bool:
        return self.process.poll() is None

    def ready(self, timeout: float = 0) -> bool:
        """Whether it has its imports, so that a fork is answered at once, waiting up to
        `timeout` seconds for them; False also when it is gone."""
        if not self._ready and select.select([self._control], [], [], timeout)[0]:
            with contextlib.suppress(ZygoteError):  # gone: fork() says so
                self._expect(READY)
        return self._ready

    def fork(self, *, stdin: int) -> ForkedChild:
        """A new child reading `stdin` (the caller keeps its own copy of that descriptor), once
        the zygote has its imports; ZygoteError if the zygote is gone or refuses."""
        if self.refusal is not None:
            raise ZygoteError(self.refusal)
        if not self._ready:
            self._expect(READY)
        ours, theirs = [], [stdin]
        try:
            for _ in range(FORK_FDS - 1):
                read, write = os.pipe()
                ours.append(read)
                theirs.append(write)
            try:
                socket.send_fds(self._control, [FORK], theirs)
            except OSError as exc:
                raise ZygoteError(f"the zygote is gone ({exc.strerror})") from exc
            finally:
                for descriptor in theirs[1:]:
                    os.close(descriptor)
            message, fds = self._receive()
            if not fds:
                self._refused(message)
        except BaseException:
            for descriptor in ours:
                os.close(descriptor)
            raise
        stdout, stderr, status = ours
        return ForkedChild(
            pid=int(message), pidfd=fds[0], stdout=stdout, stderr=stderr, status=status
        )

    def stop(self) -> None:
        """End the zygote, and with it the children it forked that are still alive."""
        self._control.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def _expect(self, expected: bytes) -> None:
        message, fds = self._receive()
        for descriptor in fds:
            os.close(descriptor)
        if message != expected:
            self._refused(message)
        self._ready = True

    def _refused(self, message: bytes) -> NoReturn:
        if not message:
            raise ZygoteError("the zygote is gone")
        self.refusal = message.decode(errors="replace")
        raise ZygoteError(self.refusal)

    def _receive(self) -> tuple[bytes, list[int]]:
        try:
            message, fds, _flags, _address = socket.recv_fds(self._control, MESSAGE_BYTES, 1)
        except OSError as exc:
            raise ZygoteError(f"the zygote is gone ({exc.strerror})") from exc
        return message, fds


class ForkedChild:
    """A child the zygote forked, as the parts of subprocess.Popen a job's supervision uses."""

    def __init__(self, *, pid: int, pidfd: int, stdout: int, stderr: int, status: int):
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._status = status
        # As Popen(text=True, errors="replace", bufsize=1) opens them.
        self.stdout = open(stdout, errors="replace")  # noqa: SIM115  closed with the child
        self.stderr = open(stderr, errors="replace")  # noqa: SIM115

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._status], [], [], 0)[0]:
            self._reap()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._status], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(ZYGOTE_COMMAND, timeout)
            self._reap()
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self) -> tuple[str, str]:
        """What is left on its stdout and stderr, once it has exited."""
        output = self.stdout.read(), self.stderr.read()
        self.wait()
        self.stdout.close()
        self.stderr.close()
        return output

    def _reap(self) -> None:
        text = os.read(self._status, 64)
        # Nothing written: the zygote died first, and so did this child (it dies with it).
        self.returncode = int(text) if text else -signal.SIGKILL
        os.close(self._status)
        os.close(self._pidfd)


def main(argv: list[str]) -> int:
    """The zygote: import, say READY, fork on request; the code a forked child exits with."""
    entry_name, control_fd, threads = argv
    keep_private()
    die_with_parent()
    entry = importlib.import_module(entry_name)
    entry.zygote_warm_up()
    control = socket.socket(fileno=int(control_fd))
    wakeup_read, wakeup_write = os.pipe()
    os.set_blocking(wakeup_write, False)
    signal.set_wakeup_fd(wakeup_write)
    signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
    statuses: dict[int, int] = {}  # a child's pid: the status pipe its exit code goes to
    refusal = _fork_refusal()
    if refusal:
        control.send(refusal)
        return 1
    control.send(READY)
    while True:
        readable = select.select([control, wakeup_read], [], [])[0]
        if wakeup_read in readable:
            os.read(wakeup_read, MESSAGE_BYTES)
            _reap(statuses)
        if control not in readable:
            continue
        message, fds, _flags, _address = socket.recv_fds(control, MESSAGE_BYTES, FORK_FDS)
        if not message:  # the pool process closed its end: its children die with this one
            return 0
        if len(fds) != FORK_FDS:
            _close(fds)
            control.send(b"a fork request hands over %d descriptors" % FORK_FDS)
            continue
        refusal = _fork_refusal()
        if refusal:
            _close(fds)
            control.send(refusal)
            continue
        pid = os.fork()
        if pid == 0:
            zygote_fds = (control.detach(), wakeup_read, wakeup_write, *statuses.values())
            os.environ["OMP_NUM_THREADS"] = threads  # the entry's main takes its share
            return _child(entry, fds, zygote_fds)
        *child_ends, status = fds
        _close(child_ends)
        statuses[pid] = status
        pidfd = os.pidfd_open(pid)  # before any reaping: the pid is still this child's
        try:
            socket.send_fds(control, [str(pid).encode()], [pidfd])
        finally:
            os.close(pidfd)


def _fork_refusal() -> bytes:
    """Why this process cannot fork safely, if it cannot: another thread (say, one an import
    started) may hold a lock that the child, which has only the forking thread, would wait on
    for ever. Off Linux, it has no pidfd to signal its children through, and so never forks."""
    if not hasattr(os, "pidfd_open"):
        return b"this platform has no pidfd to signal a forked child through"
    threads = len(os.listdir("/proc/self/task"))
    if threads == 1:
        return b""
    return b"the zygote has %d threads, so it cannot fork safely" % threads


def _child(entry, fds: list[int], zygote_fds: Sequence[int]) -> int:
    """In the forked child: the zygote's signal handling and descriptors gone (its siblings'
    status pipes among them, which it could otherwise write a forged exit code to), the
    request's pipes as stdin, stdout and stderr, in a session of its own; then the entry's warm
    child."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    for descriptor, standard in zip(fds[:3], (0, 1, 2), strict=True):
        os.dup2(descriptor, standard)
    _close([*fds, *zygote_fds])
    return entry.main(["--warm"])


def _reap(statuses: dict[int, int]) -> None:
    while statuses:
        try:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status = statuses.pop(pid, None)
        if status is None:
            continue
        # The pool process may have closed its end (a child it discarded): nothing to tell.
        with contextlib.suppress(BrokenPipeError):
            os.write(status, str(os.waitstatus_to_exitcode(wait_status)).encode())
        os.close(status)


def _close(fds: Sequence[int]) -> None:
    for descriptor in fds:
        with contextlib.suppress(OSError):
            os.close(descriptor)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
