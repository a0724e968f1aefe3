"""Helpers for tests that start real processes: wait for a condition, follow a process tree."""

import subprocess
import time

# How often a test's HTTP server (serve_forever) looks for shutdown(): stop() waits up to this long,
# and the default of 0.5 s, paid in every teardown, added minutes to the suite.
SERVER_POLL_S = 0.05


def wait_for(condition, *, timeout: float, what: str, every: float = 0.1):
    """Poll `condition` until it returns something truthy (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, children of children included."""
    ps = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=True)
    children: dict[int, list[int]] = {}
    for line in ps.stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (zombies count as gone)."""
    ps = subprocess.run(["ps", "-eo", "pid=,stat="], capture_output=True, text=True, check=True)
    running = {
        int(pid)
        for pid, stat in (line.split() for line in ps.stdout.splitlines())
        if stat[0] != "Z"
    }
    return pids & running
