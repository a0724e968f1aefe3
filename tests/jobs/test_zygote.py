"""The zygote warm job children are forked from (jobs.runner.zygote): a forked child behaves as
the process the worker would have started (its exit code, signals, its own session), holds
nothing that reaches the zygote or its siblings, and dies with the zygote; a zygote that cannot
fork safely refuses, and the worker then starts its children cold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from jobs.runner import warm
from jobs.runner.isolation import WaitingChild
from jobs.runner.zygote import Zygote, ZygoteError
from tests.jobs.idle_child import IDLE_ZYGOTE_COMMAND
from tests.jobs.threaded_zygote import THREADED_ZYGOTE_COMMAND
from tests.jobs.torch_threads_child import TORCH_THREADS_ZYGOTE_COMMAND

# Every test here starts processes.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repository_importable(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the zygote starts in /


@contextmanager
def _zygote(command=IDLE_ZYGOTE_COMMAND, *, threads=1):
    zygote = Zygote(threads=threads, command=command)
    try:
        yield zygote
    finally:
        zygote.stop()


@contextmanager
def _child(zygote):
    """A forked child, and the end of its stdin to send it lines on."""
    read, write = os.pipe()
    try:
        child = zygote.fork(stdin=read)
    finally:
        os.close(read)
    with open(write, "w", buffering=1) as stdin:
        try:
            yield child, stdin
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)


def _probe(child, stdin) -> dict:
    stdin.write("probe\n")
    return json.loads(child.stdout.readline())


def test_a_forked_child_exits_and_is_signalled_as_a_started_one_would_be():
    with _zygote() as zygote:
        with _child(zygote) as (child, stdin):
            assert child.poll() is None
            with pytest.raises(subprocess.TimeoutExpired):
                child.wait(timeout=0.2)
            stdin.write("exit 3\n")
            assert child.wait(timeout=10) == 3
        with _child(zygote) as (child, _stdin):
            child.send_signal(signal.SIGTERM)
            assert child.wait(timeout=10) == -signal.SIGTERM
            child.kill()  # after it was reaped: signals nothing, raises nothing
        with _child(zygote) as (child, stdin):
            assert _probe(child, stdin)["session_leader"], "its own group, for stopping ranks"
            os.killpg(child.pid, signal.SIGKILL)
            assert child.wait(timeout=10) == -signal.SIGKILL


def test_a_forked_child_holds_nothing_that_reaches_the_zygote_or_its_siblings():
    """A job in a forked child looks for descriptors it did not get (the zygote's control
    socket, a sibling's status pipe, to which it could write a forged exit code)."""
    with _zygote() as zygote, _child(zygote) as (sibling, _), _child(zygote) as (child, stdin):
        found = _probe(child, stdin)
        assert found["zygote"] == zygote.process.pid
        leaked = {
            fd: target
            for fd, target in found["fds"].items()
            if int(fd) > 2 and target.startswith(("pipe:", "socket:"))
        }
        assert leaked == {}
        assert sibling.poll() is None


def test_forked_children_die_with_their_zygote():
    zygote = Zygote(threads=1, command=IDLE_ZYGOTE_COMMAND)
    read, write = os.pipe()
    try:
        child = zygote.fork(stdin=read)
    finally:
        os.close(read)
    try:
        zygote.stop()
        assert child.wait(timeout=10) == -signal.SIGKILL
        with pytest.raises(ZygoteError, match="gone"):
            zygote.fork(stdin=write)
    finally:
        os.close(write)


def test_a_zygote_with_a_second_thread_refuses_to_fork():
    with _zygote(THREADED_ZYGOTE_COMMAND) as zygote:
        read, write = os.pipe()
        try:
            with pytest.raises(ZygoteError, match="2 threads, so it cannot fork safely"):
                zygote.fork(stdin=read)
        finally:
            os.close(read)
            os.close(write)


@pytest.fixture
def warm_idle(monkeypatch):
    monkeypatch.setattr(warm, "ZYGOTE_COMMAND", IDLE_ZYGOTE_COMMAND)
    warm.warm_children_keep(threads=1)
    yield
    warm.warm_children_stop()


def test_a_warm_child_that_died_or_has_another_thread_count_is_not_handed_a_job(warm_idle):
    """Before the zygote has its imports the next job's child is forked when it is taken; after,
    it waits forked. One that died, or has another thread count, is discarded."""
    first = warm.warm_child_take(threads=1)
    assert isinstance(first, WaitingChild) and first.process.poll() is None
    first.discard()
    assert first.process.poll() is not None
    warm.warm_child_replace()
    waiting = warm._waiting.process
    assert warm.warm_child_take(threads=2) is None, "another thread count: started cold"
    assert waiting.poll() is not None, "discarded: ended, not left waiting"
    warm.warm_child_replace()
    warm._waiting.process.kill()
    warm._waiting.process.wait(timeout=10)
    alive = warm.warm_child_take(threads=1)
    assert alive is not None and alive.process.poll() is None, "forked anew"
    alive.discard()


def test_a_dead_zygote_is_replaced_and_its_job_starts_cold(warm_idle, caplog):
    """A job's child may kill its zygote (the same user's process): the next job starts cold,
    and a new zygote is started after it."""
    warm._zygote.process.kill()
    warm._zygote.process.wait()
    assert warm.warm_child_take(threads=1) is None
    assert "zygote is gone" in caplog.text
    warm.warm_child_replace()
    assert warm._zygote is not None and warm._zygote.alive()
    alive = warm.warm_child_take(threads=1)
    assert alive is not None and alive.process.poll() is None
    alive.discard()


def test_a_zygote_that_cannot_fork_leaves_the_job_to_start_cold(monkeypatch, caplog):
    monkeypatch.setattr(warm, "ZYGOTE_COMMAND", THREADED_ZYGOTE_COMMAND)
    warm.warm_children_keep(threads=1)
    try:
        refused = warm._zygote
        assert warm.warm_child_take(threads=1) is None
        assert "2 threads, so it cannot fork safely" in caplog.text
        warm.warm_child_replace()
        assert warm._zygote is refused and warm._waiting is None, "no new zygote: none could"
        assert warm.warm_child_take(threads=1) is None
    finally:
        warm.warm_children_stop()


def test_a_child_forked_from_a_zygote_of_two_threads_per_child_computes_with_two():
    """The zygote imports torch with one thread (told two, torch starts the second at import,
    and the zygote could not fork); each child takes its share of the cores once forked."""
    with (
        _zygote(TORCH_THREADS_ZYGOTE_COMMAND, threads=2) as zygote,
        _child(zygote) as (child, _stdin),
    ):
        assert json.loads(child.stdout.readline()) == {"torch": 2, "env": "2"}
        assert child.wait(timeout=60) == 0
