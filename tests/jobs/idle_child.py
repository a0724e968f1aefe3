"""A stand-in for the job child, for tests that keep warm children but run no recipe: the zygote
started with IDLE_ZYGOTE_COMMAND imports nothing and forks children that wait on stdin until
it is closed. A test that holds the other end may send it lines first: `probe` prints the
descriptors it holds, as a job would look for a way out; `exit <code>` exits with it.
The test puts the repository on PYTHONPATH (the zygote starts in /)."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from jobs.runner.zygote import zygote_command

IDLE_ZYGOTE_COMMAND = zygote_command(__name__)


def zygote_warm_up() -> None:
    pass


def main(argv: list[str]) -> int:
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "exit":
            return int(argument)
        if command == "probe":
            print(json.dumps(_probe()), flush=True)
    return 0


def _probe() -> dict:
    """What a hostile job would look for: descriptors that lead out of its process."""
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own, closed by now
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
    return {
        "fds": fds,
        "zygote": os.getppid(),
        "session_leader": os.getsid(0) == os.getpid(),
    }
