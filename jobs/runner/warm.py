"""The job child a worker's pool process keeps warm for its next recipe job, so that a job does
not wait for a fresh interpreter to import torch and the recipes (seconds; docs/benchmarks.md).

The children are forked from a zygote (jobs.runner.zygote), which imports them once, while the
slot is idle, when the pool process starts. Forked once the previous attempt has ended, a child
waits, private and without a GPU, to be told its job's folder and GPUs (isolation.WaitingChild).
Each serves one job and is ended with it: nothing one job leaves in its process reaches the next,
and the next job's child was forked before that job's inputs existed, from a zygote that never
holds a job's. A job that comes before the zygote has its imports waits for them, as it would
for a child still importing; one whose zygote died or refused to fork starts its child cold, and
a new zygote is started once that job has ended.

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

from jobs.runner.isolation import WaitingChild
from jobs.runner.zygote import ZYGOTE_COMMAND, Zygote, ZygoteError

logger = logging.getLogger(__name__)

# This process's: the thread count its children get once it keeps them, the zygote they are
# forked from and the waiting child; what starts its own-code sandbox ahead (None: it keeps
# none), and the sandbox waiting.
_threads: int | None = None
_zygote: Zygote | None = None
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
    global _threads, _zygote, _waiting, _sandbox_start, _sandbox
    waiting, _threads, _waiting = _waiting, None, None
    zygote, _zygote = _zygote, None
    sandbox, _sandbox_start, _sandbox = _sandbox, None, None
    if waiting is not None:
        waiting.discard()
    if zygote is not None:
        zygote.stop()
    if sandbox is not None:
        sandbox.discard()


def warm_child_take(
    *, threads: int, meanwhile: Callable[[], Any] = lambda: None, every: float = 0.5
) -> WaitingChild | None:
    """The waiting child, or else one forked now, for a job whose child gets `threads`; None
    when neither can be had with that many (the caller starts one cold).

    A zygote still importing is waited for, calling `meanwhile` (what keeps the attempt's lease)
    at least `every` seconds, as a started child still importing would be.
    """
    global _waiting
    waiting, _waiting = _waiting, None
    if waiting is not None and (waiting.threads != threads or waiting.process.poll() is not None):
        waiting.discard()
        waiting = None
    if waiting is None and _usable(_zygote) and _zygote.threads == threads:
        while not _zygote.ready(timeout=every) and _zygote.alive() and _usable(_zygote):
            meanwhile()
        waiting = _fork()
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
    """Fork the next job's child once the zygote has its imports (starting a zygote if none is
    alive), and start the next own-code sandbox, if this process keeps them and none waits.
    A sandbox that cannot start is logged, never the attempt's failure: the next own-code job
    starts cold and says why if it cannot either."""
    global _zygote, _waiting, _sandbox
    if _threads is not None and _waiting is None:
        if _usable(_zygote) and not _zygote.alive():
            _zygote.stop()
            _zygote = None
        if _zygote is None:
            _zygote = Zygote(threads=_threads, command=ZYGOTE_COMMAND)
        elif _usable(_zygote) and _zygote.ready():
            _waiting = _fork()
    if _sandbox_start is not None and _sandbox is None:
        try:
            _sandbox = _sandbox_start()
        except Exception:
            logger.exception("starting a sandbox ahead of its job failed; own code starts cold")


def _usable(zygote: Zygote | None) -> bool:
    """Whether `zygote` may still fork: one that refused never will, and nor would another
    started from the same code; this process's children then all start cold."""
    return zygote is not None and zygote.refusal is None


def _fork() -> WaitingChild | None:
    """A child forked from the zygote (waiting until it has its imports); None if it cannot
    fork. A zygote that is gone is ended, and the next warm_child_replace starts another."""
    global _zygote
    try:
        return WaitingChild(threads=_zygote.threads, zygote=_zygote)
    except ZygoteError as exc:
        if _zygote.refusal is not None:
            logger.error("The job children's zygote refused to fork (%s); all start cold.", exc)
            return None
        logger.warning("The job children's zygote is gone (%s); this child starts cold.", exc)
        _zygote.stop()
        _zygote = None
        return None
