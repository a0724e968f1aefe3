"""The runtimes a worker offers: named Python environments operators install on the machine
(`torch-2.13-py311`), listed in WORKER_RUNTIMES and probed once when the worker starts.

A probe runs the runtime's own interpreter, isolated (`-I`: no PYTHONPATH, no user site), to read
its Python version and the distributions `importlib.metadata` finds. Anything that goes wrong is
the runtime's report (broken, and why), never the worker's end: a worker with a broken runtime
still runs recipes and its other runtimes.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

logger = logging.getLogger(__name__)

# What jobs name and the console shows: letters, digits, dots, dashes, underscores.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# The probe's report is its last line, so a runtime whose site hooks print something still parses.
PROBE = (
    "import importlib.metadata as m, json, platform\n"
    "packages = {}\n"
    "for d in m.distributions():\n"
    "    name = d.metadata['Name']\n"
    "    if name and name not in packages:\n"
    "        packages[name] = d.version\n"
    "print(json.dumps({'python': platform.python_version(), 'packages': packages}))\n"
)
# Enough of a broken runtime's error output to act on, not its whole traceback.
ERROR_TAIL_CHARS = 500


@dataclass(frozen=True)
class RuntimeReport:
    name: str
    interpreter: str
    python_version: str = ""
    packages: dict[str, str] = field(default_factory=dict)
    error: str = ""  # blank: the runtime works


def runtimes_configured(entries: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, interpreter) per WORKER_RUNTIMES entry `name=/path/to/python`. An entry without an
    interpreter keeps its name (its probe says what is missing); one without a usable name cannot
    be reported at all and is logged and skipped."""
    configured: dict[str, str] = {}
    for entry in settings.WORKER_RUNTIMES if entries is None else entries:
        name, _, interpreter = entry.strip().partition("=")
        name, interpreter = name.strip(), interpreter.strip()
        if not NAME.match(name):
            logger.error("WORKER_RUNTIMES: %r is not name=/path/to/python; skipped", entry)
            continue
        configured[name] = interpreter
    return list(configured.items())


def runtime_probe(name: str, interpreter: str, *, timeout_s: float | None = None) -> RuntimeReport:
    """What `interpreter` offers, or why it is broken; never raises for the runtime's faults."""
    timeout_s = settings.WORKER_RUNTIME_PROBE_TIMEOUT_S if timeout_s is None else timeout_s

    def broken(reason: str) -> RuntimeReport:
        logger.warning("runtime %s (%s) is broken: %s", name, interpreter, reason)
        return RuntimeReport(name=name, interpreter=interpreter, error=reason)

    if not interpreter:
        return broken("no interpreter given: WORKER_RUNTIMES wants name=/path/to/python")
    if not Path(interpreter).is_absolute():
        return broken(f"the interpreter {interpreter} is not an absolute path")
    try:
        done = subprocess.run(
            [interpreter, "-I", "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return broken(f"its interpreter did not answer within {timeout_s:g} s")
    except OSError as exc:
        return broken(f"its interpreter cannot run: {exc.strerror or exc}")
    if done.returncode != 0:
        tail = done.stderr.strip()[-ERROR_TAIL_CHARS:]
        return broken(f"its interpreter exited with status {done.returncode}: {tail}".rstrip(": "))
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
        python, packages = str(found["python"]), found["packages"]
        packages = {str(k): str(v) for k, v in packages.items()}
    except (IndexError, KeyError, TypeError, AttributeError, ValueError):
        return broken("its interpreter printed no report of its packages")
    return RuntimeReport(
        name=name, interpreter=interpreter, python_version=python, packages=packages
    )


def runtimes_probe(entries: list[str] | None = None) -> list[RuntimeReport]:
    """Every configured runtime's report, in the order configured."""
    return [runtime_probe(name, path) for name, path in runtimes_configured(entries)]
