"""Tests that start processes are marked `slow`, so that `make test-fast` starts none: a test
not marked that starts one fails, naming how.

A plugin (listed in tests/conftest.py's pytest_plugins), not conftest hooks: pytest asks only
the root's plugins, not a folder's conftest, to set up session-scoped fixtures.
"""

import _posixsubprocess
import os
import platform
import subprocess

import pytest

# Every way a test's process starts another: subprocess (its own binding of fork_exec),
# multiprocessing's spawn (fork_exec read from its module), os.posix_spawn and a bare fork.
PROCESS_STARTS = (
    (subprocess, "_fork_exec"),
    (_posixsubprocess, "fork_exec"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "fork"),
)
_processes_started = pytest.StashKey[list]()
_running: list[pytest.Item] = []  # the test whose setup, call or teardown runs now
_shared_setups: list[str] = []  # module- or session-scoped fixtures being set up now


def pytest_configure(config):
    """Note on the running test each process it starts (PROCESS_STARTS, for the whole session),
    except in the setup of a module- or session-scoped fixture: that process serves many tests
    once (a model trained for a module's tests), not each test."""
    # The Stripe SDK's user agent asks for the processor's name, which runs `uname -p` once per
    # process and is kept: asked here, no test that happens to be first to call Stripe pays it.
    platform.processor()

    def watched(module, name):
        original = getattr(module, name)

        def start(*args, **kwargs):
            if _running and not _shared_setups:
                _running[-1].stash.setdefault(_processes_started, []).append(
                    f"{module.__name__}.{name}"
                )
            return original(*args, **kwargs)

        return start

    for module, name in PROCESS_STARTS:
        setattr(module, name, watched(module, name))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    shared = fixturedef.scope != "function"
    if shared:
        _shared_setups.append(fixturedef.argname)
    try:
        return (yield)
    finally:
        if shared:
            _shared_setups.pop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test not marked `slow` that started a process (in its body or a function-scoped
    fixture) fails at its teardown, naming how: `make test-fast` is the subset that starts none,
    and stays so as tests are added."""
    report = yield
    started = item.stash.get(_processes_started, [])
    if (
        call.when == "teardown"
        and started
        and report.passed
        and not item.get_closest_marker("slow")
        and not item.get_closest_marker("serial")
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} started processes ({', '.join(sorted(set(started)))}) but is not "
            "marked slow: mark it @pytest.mark.slow, or add the fixture that starts them to "
            "SLOW_FIXTURES (tests/conftest.py), so that `make test-fast` stays the subset that "
            "starts none"
        )
    return report
