"""The job child a worker's pool process keeps warm for its next recipe job, so that a job does
not wait for a fresh interpreter to import torch and the recipes (seconds; docs/benchmarks.md).

Started once the previous attempt has ended, the child imports them while the slot is idle, then
waits, private and without a GPU, to be told its job's folder and GPUs (isolation.WaitingChild).
Each serves one job and is ended with it: nothing one job leaves in its process reaches the next,
and the next job's child was started before that job's inputs existed.

Only a worker's pool processes keep one (jobs.worker starts keeping them); elsewhere, as in
tests that call run_attempt themselves, each attempt starts its child cold. Own-code packages
start theirs in the sandbox, cold (a warm sandboxed child is for later).

No Django here, as in isolation.
"""

from __future__ import annotations

from jobs.runner.isolation import CHILD_COMMAND, WaitingChild

WARM_COMMAND = (*CHILD_COMMAND, "--warm")

# This process's: the thread count its children get once it keeps them, and the waiting child.
_threads: int | None = None
_waiting: WaitingChild | None = None


def warm_children_keep(*, threads: int) -> None:
    """From now on keep a child with `threads` warm for this process's next job.

    Call it from the thread that runs the attempts: a child dies with the thread that started it
    (PR_SET_PDEATHSIG), and the next one is started at the end of an attempt.
    """
    global _threads
    _threads = threads
    warm_child_replace()


def warm_children_stop() -> None:
    """Keep no more warm children; end the one waiting, if any."""
    global _threads, _waiting
    waiting, _threads, _waiting = _waiting, None, None
    if waiting is not None:
        waiting.discard()


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


def warm_child_replace() -> None:
    """Start the next job's child, if this process keeps them and none waits."""
    global _waiting
    if _threads is not None and _waiting is None:
        _waiting = WaitingChild(threads=_threads, command=WARM_COMMAND)
