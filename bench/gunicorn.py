"""The web process as the production image runs it (gunicorn with an access log), on a free
port of this machine, for the benches that measure through it (load, serving)."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def gunicorn(
    env: dict,
    tmp: Path,
    *,
    workers: int,
    kind: str = "sync",
    threads: int = 1,
    options: tuple[str, ...] = (),
) -> Iterator[tuple[int, int]]:
    """(port, master pid) once /healthz answers; stopped (TERM, then KILL) on leaving, saying
    so when its log holds tracebacks."""
    port = free_port()
    log_path = tmp / f"gunicorn-{kind}-{workers}x{threads}.log"
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "factory_saas.wsgi:application",
        f"--bind=127.0.0.1:{port}",
        f"--workers={workers}",
        f"--worker-class={kind}",
        f"--threads={threads}",
        f"--chdir={REPO_ROOT}",
        # As the production image: an access log line per request (there to stdout).
        f"--access-logfile={tmp / 'access.log'}",
        *options,
    ]
    with log_path.open("wb") as log:
        master = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    progress(f"gunicorn: {workers} {kind} workers x {threads} threads on 127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if master.poll() is not None:
                raise SystemExit(f"gunicorn exited with {master.returncode}:\n{tail(log_path)}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"gunicorn not up in {START_TIMEOUT_S} s:\n{tail(log_path)}")
            time.sleep(0.2)
        yield port, master.pid
    finally:
        if master.poll() is None:
            os.killpg(master.pid, signal.SIGTERM)
            try:
                master.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, signal.SIGKILL)
                master.wait()
        errors = [line for line in tail(log_path, 200).splitlines() if "Traceback" in line]
        if errors:
            progress(f"gunicorn log has {len(errors)} tracebacks:\n{tail(log_path, 40)}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
