"""The job child a worker's pool process keeps warm for its next recipe job, so that a job does
not wait for a fresh interpreter to import torch and the recipes (seconds; docs/benchmarks.md).

Started once the previous attempt has ended, the child imports them while the slot is idle, then
waits, private and without a GPU, to be told its job's folder and GPUs (isolation.WaitingChild).
Each serves one job and is ended with it: nothing one job leaves in its process reaches the next,
and the next job's child was started before that job's inputs existed.

Own-code packages get the same from a sandbox started ahead (code.WarmSandbox), for the jobs
that fit one: the worker's default runtime, no GPU, not a replica; the others start theirs
cold. A CPU worker's pool process keeps one of each, each replaced once it served a job.

Only a worker's pool processes keep them (jobs.worker starts keeping them); elsewhere, as in
tests that call run_attempt themselves, each attempt starts its child cold.

No Django here, as in isolation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from jobs.runner.isolation import CHILD_COMMAND, WaitingChild

logger = logging.getLogger(__name__)

WARM_COMMAND = (*CHILD_COMMAND, "--warm")

# This process's: the thread count its children get once it keeps them, and the waiting child;
# what starts its own-code sandbox ahead (None: it keeps none), and the sandbox waiting.
_threads: int | None = None
_waiting: WaitingChild | None = None
_sandbox_start: Callable[[], Any] | None = None
_sandbox: Any = None


def warm_children_keep(*, threads: int, sandbox: Callable[[], Any] | None = None) -> None:
    """From now on keep a child with `threads` warm for this process's next job, and, given
    `sandbox` (what starts a code.WarmSandbox), a sandbox for its next own-code job.

    Call it from the thread that runs the attempts: a child dies with the thread that started it
    (PR_SET_PDEATHSIG, bubblewrap's --die-with-parent), and the next one is started at the end of
    an attempt.
    """
    global _threads, _sandbox_start
    _threads, _sandbox_start = threads, sandbox
    warm_child_replace()


def warm_children_stop() -> None:
    """Keep no more warm children; end the ones waiting, if any."""
    global _threads, _waiting, _sandbox_start, _sandbox
    waiting, _threads, _waiting = _waiting, None, None
    sandbox, _sandbox_start, _sandbox = _sandbox, None, None
    if waiting is not None:
        waiting.discard()
    if sandbox is not None:
        sandbox.discard()


def warm_child_take(*, threads: int) -> WaitingChild | None:
    """The waiting child, for a job whose child gets `threads`; None when there is none alive
    with that many (the caller starts one cold)."""
    global _waiting
    waiting, _waiting = _waiting, None
    if waiting is None:
        return None
    if waiting.threads != threads or waiting.process.poll() is not None:
        waiting.discard()
        return None
    return waiting


def warm_sandbox_take(fits: Callable[[Any], bool]):
    """The waiting own-code sandbox, for a job it `fits`; None when there is none alive, or it
    does not fit (it then waits on for a job that does) and the caller starts one cold."""
    global _sandbox
    sandbox = _sandbox
    if sandbox is None:
        return None
    if not sandbox.alive():
        _sandbox = None  # replaced once this job ends, as after any job
        sandbox.discard()
        return None
    if not fits(sandbox):
        return None
    _sandbox = None
    return sandbox


def warm_child_replace() -> None:
    """Start the next job's child and own-code sandbox, if this process keeps them and none
    waits. A sandbox that cannot start is logged, never the attempt's failure: the next own-code
    job starts cold and says why if it cannot either."""
    global _waiting, _sandbox
    if _threads is not None and _waiting is None:
        _waiting = WaitingChild(threads=_threads, command=WARM_COMMAND)
    if _sandbox_start is not None and _sandbox is None:
        try:
            _sandbox = _sandbox_start()
        except Exception:
            logger.exception("starting a sandbox ahead of its job failed; own code starts cold")
