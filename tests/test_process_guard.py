"""The guard that keeps `make test-fast` free of processes (tests/process_guard.py), run on test
files written to slip a process past it."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Each run is a pytest of its own: it starts a process.
pytestmark = pytest.mark.slow

CASES = """
import multiprocessing
import os
import subprocess
import sys

import pytest


def test_runs_a_command():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_forks():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def test_spawns_through_multiprocessing():
    process = multiprocessing.get_context("spawn").Process(target=print)
    process.start()
    process.join()


@pytest.mark.slow
def test_runs_a_command_and_says_so():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


@pytest.fixture(scope="module")
def shared_model():
    return subprocess.run([sys.executable, "-c", "print(42)"], capture_output=True).stdout


def test_uses_a_model_its_module_trained_once(shared_model):
    assert shared_model.strip() == b"42"


def test_starts_nothing():
    assert True
"""


def test_a_test_that_starts_a_process_unmarked_fails_and_says_how(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the pytest below loads the guard from here
    pytester.makepyfile(test_cases=CASES)
    result = pytester.runpytest_subprocess(
        "-p", "no:django", "-p", "tests.process_guard", "-p", "no:cacheprovider", "-rE"
    )
    # Every test's call passes; the three that started a process unmarked fail at teardown.
    result.assert_outcomes(passed=6, errors=3)
    result.stdout.fnmatch_lines_random(
        [
            "*::test_runs_a_command started processes (subprocess._fork_exec) but is not marked*",
            "*::test_forks started processes (os.fork) but is not marked slow*",
            "*::test_spawns_through_multiprocessing started processes (*fork_exec*) but is not*",
        ]
    )
