"""Tenant code in the sandbox, written as an attacker would write it, finds nothing and breaks
nothing: each test runs a real Python script in a real bubblewrap sandbox (jobs.runner.sandbox)
and checks that the attack was denied or contained, that the parent can say why in words, and
that nothing of the sandbox is left running afterwards.

Where the attack is a read or a connection, the same script run without the sandbox, as the same
user, succeeds: the denial comes from the sandbox, not from file modes or a closed port.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from billing.models import UsageRecord
from jobs.models import JobAttempt, JobMetric, JobState
from jobs.runner import parent, sandbox
from jobs.runner.isolation import ChildFileRefused, child_file_open
from jobs.runner.parent import run_attempt
from jobs.runner.protocol import EXIT_STOPPED, format_line
from jobs.runner.sandbox import (
    MB,
    WORK_FOLDER,
    Limits,
    SandboxRefused,
    SandboxSpec,
    python_runtime,
    runtime_refusal,
    sandbox_check,
    sandbox_run,
    sandbox_start,
    sandbox_unavailable_reason,
    work_folder_usage,
)
from jobs.scheduler.apply import scheduler_pass
from jobs.services.pool import worker_register
from registry.models import ModelVersion
from registry.services import dataset_create, dataset_version_create
from tenants.actors import Actor
from tests.factories import JobFactory
from tests.jobs.test_pool_e2e import _separable_csv

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "SECRET_KEY": "sandbox-test-secret-key-4f1a9c",
    "DATABASE_URL": "postgres://factory:sandbox-db-password-9e2b@127.0.0.1:5432/factory",
}
ENV_FILE_SECRET = "STRIPE_SECRET_KEY=sk_live_from-the-env-file-7d3e"
SQLITE_SECRET = "row-from-the-sqlite-file-a61c"
STORAGE_SECRET = "object-from-the-storage-folder-05bd"
NEIGHBOUR_SECRET = "another-attempts-dataset-c8e4"
WEB_SECRET = "answer-of-a-web-port-on-the-host-3f70"
ALL_SECRETS = [
    *SECRETS.values(),
    ENV_FILE_SECRET,
    SQLITE_SECRET,
    STORAGE_SECRET,
    NEIGHBOUR_SECRET,
    WEB_SECRET,
]


def _runtime() -> sandbox.Runtime:
    """This interpreter's installation when the sandbox's user can read it, else the system's
    Python (the attacks need only the standard library)."""
    runtime = python_runtime(sys.executable)
    return python_runtime("/usr/bin/python3") if runtime_refusal(runtime) else runtime


@pytest.fixture(scope="module")
def runtime():
    reason = sandbox_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)  # test_this_worker_can_run_sandboxes fails with the reason
    return _runtime()


@pytest.mark.slow
def test_this_worker_can_run_sandboxes():
    assert sandbox_unavailable_reason() is None


@pytest.fixture
def host():
    """A corner of the host the attacker would like to read: a project checkout with its .env
    and SQLite file, the local storage folder, the work root with another attempt's folder.
    Every file is readable by the sandbox's user outside the sandbox."""
    root = Path(tempfile.mkdtemp(prefix="sandbox-host-", dir="/tmp"))
    root.chmod(0o755)
    project = root / "project"
    project.mkdir()
    (project / ".env").write_text(f"{ENV_FILE_SECRET}\n")
    with sqlite3.connect(project / "db.sqlite3") as database:
        database.execute("create table secret (value text)")
        database.execute("insert into secret values (?)", (SQLITE_SECRET,))
    database.close()
    storage = root / "storage" / "orgs" / "1" / "datasets"
    storage.mkdir(parents=True)
    (storage / "rows.csv").write_text(f"x\n{STORAGE_SECRET}\n")
    work = root / "work"
    work.mkdir(mode=0o711)
    neighbour = work / f"job-1-attempt-1-{os.urandom(8).hex()}"
    neighbour.mkdir(mode=0o700)
    (neighbour / "dataset.csv").write_text(f"x\n{NEIGHBOUR_SECRET}\n")
    own = work / f"job-2-attempt-1-{os.urandom(8).hex()}"
    own.mkdir(mode=0o700)
    code = root / "code"
    code.mkdir()
    if os.geteuid() == 0:
        for path in (project / ".env", project / "db.sqlite3", storage / "rows.csv"):
            path.chmod(0o644)
        for path in (neighbour, neighbour / "dataset.csv"):
            os.chown(path, sandbox.SANDBOX_UID, sandbox.SANDBOX_GID)
    try:
        yield SimpleNamespace(
            root=root,
            project=project,
            storage=storage,
            neighbour=neighbour,
            work=own,
            code=code,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _spec(runtime, host, script: str, *args: str, limits: Limits | None = None, **extra):
    (host.code / "attack.py").write_text(script)
    return SandboxSpec(
        command=(runtime.interpreter, "/code/attack.py", *args),
        work_folder=host.work,
        read_only={**runtime.read_only, "/code": host.code},
        environment=runtime.environment,
        limits=limits or Limits(wall_clock_s=60, memory_bytes=1024 * MB, processes=64),
        **extra,
    )


def _unsandboxed(runtime, host, script: str, *args: str) -> subprocess.CompletedProcess:
    """The same script as a plain child of the same user would run it: the control."""
    (host.code / "attack.py").write_text(script)
    user = (
        {"user": sandbox.SANDBOX_UID, "group": sandbox.SANDBOX_GID, "extra_groups": []}
        if os.geteuid() == 0
        else {}
    )
    return subprocess.run(
        [runtime.interpreter, str(host.code / "attack.py"), *args],
        cwd=host.work,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        **user,
    )


def _report(result) -> dict:
    lines = [payload for kind, payload in result.events if kind == "log"]
    assert lines, (result.ending, result.stderr[-20:])
    return json.loads(lines[-1])


def _namespace_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _left_in(namespace: str) -> list[int]:
    """(pid, /proc/<pid>/stat) of the processes still alive (not zombies) in the PID namespace
    `namespace`."""
    left = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        if _namespace_of(int(name)) != namespace:
            continue
        try:
            state = sandbox._stat_fields(int(name))[0]
        except (OSError, IndexError, ValueError):
            continue
        if state != "Z":
            left.append((int(name), Path(f"/proc/{name}/stat").read_text()))
    return left


def _run_watched(spec: SandboxSpec, *, until=None) -> tuple[sandbox.SandboxResult, dict]:
    """sandbox_run, watching the sandbox from outside as it runs: its PID namespace once its
    child runs (and `until` holds, if given), so that the test can check nothing of it is left,
    and the most tasks it ever had at once."""
    seen: dict = {"namespace": None, "most_tasks": 0}
    original = sandbox.sandbox_start

    def start(*args, **kwargs):
        process = original(*args, **kwargs)

        def watch():
            while process.poll() is None:
                processes = process.processes()
                tasks, _ = sandbox._tasks_and_memory(processes)
                seen["most_tasks"] = max(seen["most_tasks"], tasks)
                if (
                    seen["namespace"] is None
                    and len(processes) > 1
                    and (until is None or until(process))
                ):
                    seen["namespace"] = _namespace_of(processes[-1])
                time.sleep(0.002)  # sampling a process we do not control

        threading.Thread(target=watch, daemon=True).start()
        return process

    sandbox.sandbox_start = start
    try:
        result = sandbox_run(spec)
    finally:
        sandbox.sandbox_start = original
    return result, seen


def _machine_still_works() -> None:
    assert subprocess.run(["true"], check=False, timeout=30).returncode == 0


PROBE = r"""
import json, os, socket, sys

plan = json.loads(sys.argv[1])
report = {}


def attempt(name, action):
    try:
        report[name] = ["done", repr(action())[:2000]]
    except Exception as exc:
        report[name] = ["denied", type(exc).__name__]


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


def connect(host, port):
    with socket.create_connection((host, port), timeout=3) as connection:
        connection.settimeout(0.5)
        try:
            return connection.recv(200)
        except socket.timeout:
            return b"connected"


for path in plan.get("files", []):
    attempt(f"read {path}", lambda path=path: read(path))
for pid in plan.get("pids", []):
    for what in ("environ", "cmdline"):
        attempt(f"{what} of {pid}", lambda pid=pid, what=what: read(f"/proc/{pid}/{what}"))
if plan.get("all_processes"):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for what in ("environ", "cmdline"):
            attempt(f"{what} of {pid}", lambda pid=pid, what=what: read(f"/proc/{pid}/{what}"))
    report["own environment"] = ["done", repr(dict(os.environ))]
for host, port in plan.get("connect", []):
    attempt(f"connect {host}:{port}", lambda host=host, port=port: connect(host, port))
for path in plan.get("writes", []):
    attempt(f"write {path}", lambda path=path: open(path, "w").write("pwned"))
print(json.dumps(report))
"""


@pytest.mark.slow
def test_the_parents_secrets_are_not_in_any_environment_the_child_can_read(
    runtime, host, monkeypatch
):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    plan = {"pids": [1, os.getpid(), os.getppid()], "all_processes": True}

    result = sandbox_run(_spec(runtime, host, PROBE, json.dumps(plan)))

    assert result.ending.succeeded, (result.ending, result.stderr[-20:])
    report = _report(result)
    everything = json.dumps(report)
    assert not [value for value in SECRETS.values() if value in everything]
    # The parent is not even there to ask: the sandbox has its own PID namespace.
    assert report[f"environ of {os.getpid()}"] == ["denied", "FileNotFoundError"]
    assert report["environ of 1"][0] == "done"  # bubblewrap's own, empty of secrets
    control = _unsandboxed(runtime, host, PROBE, json.dumps({"all_processes": True}))
    assert SECRETS["SECRET_KEY"] in control.stdout


@pytest.mark.slow
def test_the_hosts_files_are_out_of_reach(runtime, host):
    files = [
        host.project / ".env",
        host.project / "db.sqlite3",
        host.storage / "rows.csv",
        host.neighbour / "dataset.csv",
        REPO / ".env",
        REPO / "db.sqlite3",
        "/etc/passwd",
        "/etc/shadow",
        "/root/.bash_history",
    ]
    plan = {"files": list(map(str, files))}

    result = sandbox_run(_spec(runtime, host, PROBE, json.dumps(plan)))

    assert result.ending.succeeded, (result.ending, result.stderr[-20:])
    report = _report(result)
    assert {how for how, _ in report.values()} == {"denied"}, report
    assert not [secret for secret in ALL_SECRETS if secret in json.dumps(report)]
    control = _report_of(_unsandboxed(runtime, host, PROBE, json.dumps(plan)))
    for path in files[:4]:
        assert control[f"read {path}"][0] == "done", control


def _report_of(completed: subprocess.CompletedProcess) -> dict:
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture
def web_port():
    """A web port on the host's loopback that answers with a secret."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(WEB_SECRET.encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


@pytest.mark.slow
def test_the_network_is_out_of_reach(runtime, host, web_port):
    targets = [("127.0.0.1", 5432), ("127.0.0.1", 6379), ("127.0.0.1", web_port)]
    plan = {
        "connect": [*targets, ("1.1.1.1", 443), ("::1", web_port)],
        "files": ["/var/run/postgresql/.s.PGSQL.5432", "/var/run/redis/redis-server.sock"],
    }

    result = sandbox_run(_spec(runtime, host, PROBE, json.dumps(plan)))

    assert result.ending.succeeded, (result.ending, result.stderr[-20:])
    report = _report(result)
    assert {how for how, _ in report.values()} == {"denied"}, report
    assert WEB_SECRET not in json.dumps(report)
    control = _report_of(_unsandboxed(runtime, host, PROBE, json.dumps({"connect": targets})))
    assert {how for how, _ in control.values()} == {"done"}, control
    assert WEB_SECRET in json.dumps(control)


@pytest.mark.slow
def test_nothing_outside_the_work_folder_can_be_written(runtime, host):
    places = [
        "/pwned",
        "/usr/pwned",
        "/usr/bin/python3",
        "/etc/passwd",
        "/dev/pwned",
        "/proc/sys/kernel/hostname",
        "/proc/sysrq-trigger",
        "/code/attack.py",
        *(f"{inside}/pwned" for inside in runtime.read_only),
        str(host.project / "pwned"),
        str(host.neighbour / "pwned"),
    ]
    plan = {"writes": places}

    result = sandbox_run(_spec(runtime, host, PROBE, json.dumps(plan)))

    assert result.ending.succeeded, (result.ending, result.stderr[-20:])
    report = _report(result)
    assert {how for how, _ in report.values()} == {"denied"}, report
    assert not (host.project / "pwned").exists()
    assert not (host.neighbour / "pwned").exists()
    assert (host.code / "attack.py").read_text() == PROBE


TMP_FILL = r"""
import errno, sys

written = {}
for folder in ("/tmp", "/dev/shm"):
    written[folder] = 0
    try:
        with open(f"{folder}/fill", "wb") as handle:
            while True:
                handle.write(b"x" * 1024 * 1024)
                handle.flush()
                written[folder] += 1
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
print(written)
"""


@pytest.mark.slow
def test_tmp_and_shared_memory_fill_up_at_their_size(runtime, host):
    limits = Limits(wall_clock_s=60, memory_bytes=1024 * MB, processes=64, tmp_bytes=16 * MB)

    result = sandbox_run(_spec(runtime, host, TMP_FILL, limits=limits))

    assert result.ending.succeeded, (result.ending, result.stderr[-20:])
    written = eval(result.events[-1][1])  # noqa: S307 - the dict the child printed, in a test
    assert written == {sandbox.TMP: 16, sandbox.SHM: 16}


FORK_BOMB = r"""
import os

while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.mark.slow
def test_a_fork_bomb_is_killed_at_the_process_limit(runtime, host):
    limits = Limits(wall_clock_s=60, memory_bytes=1024 * MB, processes=32)

    result, seen = _run_watched(_spec(runtime, host, FORK_BOMB, limits=limits))

    assert result.ending.limit == "processes", result.ending
    assert result.ending.reason == "killed: process limit 32 reached"
    # The kernel held the limit (RLIMIT_NPROC, counted in the sandbox's user namespace): the
    # watchdog, polling, only ended what could not grow.
    assert seen["most_tasks"] <= 32, seen
    assert result.duration_s < 30
    assert seen["namespace"] is not None and _left_in(seen["namespace"]) == []
    _machine_still_works()


MEMORY_HOG = r"""
held = []
while True:
    held.append(bytearray(8 * 1024 * 1024))  # zero-filled: every page is touched
"""


@pytest.mark.slow
def test_memory_without_end_is_refused_at_the_limit(runtime, host):
    limits = Limits(wall_clock_s=60, memory_bytes=256 * MB, processes=64)

    result = sandbox_run(_spec(runtime, host, MEMORY_HOG, limits=limits))

    assert result.ending.limit == "memory", (result.ending, result.stderr[-5:])
    assert result.ending.reason == (
        "failed: memory limit 256 MB reached (an allocation was refused; exit code 1)"
    )
    _machine_still_works()


@pytest.mark.slow
def test_memory_without_end_is_killed_by_the_watchdog_where_gpus_rule_out_an_address_limit(
    runtime, host
):
    """Any device makes the sandbox a GPU one, without RLIMIT_AS (CUDA reserves far more address
    space than it uses): /dev/zero stands in for a GPU's node."""
    limits = Limits(wall_clock_s=60, memory_bytes=256 * MB, processes=64)
    spec = _spec(runtime, host, MEMORY_HOG, limits=limits, devices=("/dev/zero",))

    result, seen = _run_watched(spec)

    assert result.ending.limit == "memory", (result.ending, result.stderr[-5:])
    assert result.ending.reason == "killed: memory limit 256 MB exceeded"
    assert seen["namespace"] is not None and _left_in(seen["namespace"]) == []
    _machine_still_works()


DISK_FILL = r"""
import os, sys

if sys.argv[1] == "one file":
    with open("fill", "wb") as handle:
        while True:
            handle.write(b"x" * 1024 * 1024)
index = 0
while True:
    with open(f"fill-{index}", "wb") as handle:
        handle.write(b"x" * 1024 * 1024 if sys.argv[1] == "many files" else b"")
    index += 1
"""


@pytest.mark.parametrize(
    ("how", "limit", "reason"),
    [
        ("many files", "work_folder", "killed: work folder limit 32 MB exceeded"),
        ("empty files", "work_folder", "killed: work folder limit 500 files exceeded"),
        (
            "one file",
            "file_size",
            "failed: file size limit 32 MB reached (a write was refused; exit code 1)",
        ),
    ],
)
@pytest.mark.slow
def test_filling_the_work_folder_is_stopped_at_its_limit(runtime, host, how, limit, reason):
    limits = Limits(
        wall_clock_s=60,
        memory_bytes=1024 * MB,
        processes=64,
        work_folder_bytes=32 * MB,
        work_folder_entries=500,
    )

    result, seen = _run_watched(_spec(runtime, host, DISK_FILL, how, limits=limits))

    assert (result.ending.limit, result.ending.reason) == (limit, reason), result.stderr[-5:]
    assert seen["namespace"] is None or _left_in(seen["namespace"]) == []
    shutil.rmtree(host.work)  # the parent clears the folder, whatever the child left in it
    _machine_still_works()


OVERSTAY = r"""
import os, signal, sys, time

if sys.argv[1] == "ignores SIGTERM":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.fork() == 0:  # a grandchild in its own session, ignoring SIGTERM too
        os.setsid()
        time.sleep(3600)
print("started", flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("sleeps", "killed: wall-clock limit 1 s"),
        (
            "ignores SIGTERM",
            "killed: wall-clock limit 1 s (it did not stop within 1 s of SIGTERM)",
        ),
    ],
)
@pytest.mark.slow
def test_running_past_the_wall_clock_is_killed_with_everything_it_started(
    runtime, host, how, reason
):
    limits = Limits(wall_clock_s=1, memory_bytes=1024 * MB, processes=64, stop_grace_s=1)

    result, seen = _run_watched(
        _spec(runtime, host, OVERSTAY, how, limits=limits),
        until=lambda process: len(process.processes()) >= (2 if how == "sleeps" else 3),
    )

    assert result.ending.limit == "wall_clock" and result.ending.reason == reason
    assert 1 <= result.duration_s < 10
    assert seen["namespace"] is not None and _left_in(seen["namespace"]) == []
    _machine_still_works()


LINKS = r"""
import json, os, sys

secret = sys.argv[1]
os.symlink(secret, "escape")
os.symlink("/", "host-root")
os.makedirs("output")
os.symlink(secret, "output/model.safetensors")
report = {}
for path in ("escape", "host-root" + secret, "output/model.safetensors"):
    try:
        report[path] = ["done", open(path).read()]
    except OSError as exc:
        report[path] = ["denied", type(exc).__name__]
print(json.dumps(report))
"""


@pytest.mark.slow
def test_a_link_planted_in_the_work_folder_leads_nowhere(runtime, host):
    secret = host.project / ".env"

    result = sandbox_run(_spec(runtime, host, LINKS, str(secret)))

    assert result.ending.succeeded, (result.ending, result.stderr[-20:])
    report = _report(result)
    assert {how for how, _ in report.values()} == {"denied"}, report
    # The parent, which can read the target, follows none of the links either.
    with (
        pytest.raises(ChildFileRefused, match="as a link"),
        child_file_open(host.work, "output/model.safetensors"),
    ):
        pass
    used, entries = work_folder_usage(host.work, max_entries=1000)
    assert entries == 4 and used < MB  # the link to / is not walked into


def test_the_work_folder_is_measured_without_following_links(tmp_path):
    (tmp_path / "data").write_bytes(b"x" * 100_000)
    (tmp_path / "inner").mkdir()
    (tmp_path / "inner" / "usr").symlink_to("/usr")

    used, entries = work_folder_usage(tmp_path, max_entries=1000)

    assert entries == 3
    assert 100_000 <= used < 200_000


FORGER = r"""
import json, sys

lines = json.loads(sys.argv[1])
for line in lines:
    print(line, flush=True)
print("x" * 200_000)
"""


@pytest.mark.slow
def test_forged_lines_reach_the_parser_unchanged_and_a_long_line_in_pieces(runtime, host):
    """The sandbox hands stdout to protocol.parse_line as the child wrote it: a line claiming an
    attempt number is a metric with an extra key the parent never reads (attempt_report records
    the parent's own attempt), an unknown kind is a log line."""
    lines = [
        '@@metric {"step": 1, "name": "loss", "value": 0.5, "split": "train", "attempt": 7}',
        '@@attempt {"number": 7}',
        '@@checkpoint {"path": "/etc/passwd", "step": 1}',
        "@@result {not json",
    ]

    result = sandbox_run(_spec(runtime, host, FORGER, json.dumps(lines)))

    assert result.ending.succeeded
    assert result.events[:4] == [
        ("metric", {"step": 1, "name": "loss", "value": 0.5, "split": "train", "attempt": 7}),
        ("log", lines[1]),
        ("log", lines[2]),
        ("log", lines[3]),
    ]
    pieces = result.events[4:]
    assert [len(text) for _, text in pieces] == [65536, 65536, 65536, 200_000 - 3 * 65536]


@pytest.mark.slow
def test_the_parent_can_stop_it_and_the_child_hears_sigterm(runtime, host):
    script = r"""
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(sys.argv[1])))
print("started", flush=True)
time.sleep(3600)
"""
    process = sandbox_start(_spec(runtime, host, script, str(EXIT_STOPPED)))
    assert process.stdout.readline() == "started\n"

    process.stop()

    assert process.wait(timeout=30) == EXIT_STOPPED
    process.stdout.close()
    process.stderr.close()
    assert process.ending().reason == "stopped on request"
    assert process.ending().stopped and not process.ending().succeeded


def test_a_runtime_the_sandboxs_user_cannot_reach_is_refused_naming_the_folder(host):
    if os.geteuid() != 0:
        pytest.skip("only a root worker starts the sandbox as another user")
    closed = host.root / "closed"
    (closed / "runtime").mkdir(parents=True)
    closed.chmod(0o700)
    spec = SandboxSpec(
        command=("/usr/bin/true",),
        work_folder=host.work,
        read_only={"/runtime": closed / "runtime"},
    )

    with pytest.raises(SandboxRefused, match=f"{closed} is closed to other users"):
        sandbox_start(spec)


def test_a_work_root_the_sandboxs_user_cannot_pass_is_refused_naming_it(host):
    if os.geteuid() != 0:
        pytest.skip("only a root worker starts the sandbox as another user")
    closed = host.root / "closed-root"
    (closed / "job-1-attempt-1").mkdir(parents=True)
    closed.chmod(0o700)
    spec = SandboxSpec(command=("/usr/bin/true",), work_folder=closed / "job-1-attempt-1")

    with pytest.raises(SandboxRefused, match=f"{closed} is closed to other users"):
        sandbox_start(spec)


@pytest.mark.parametrize(
    "inside", ["/job", "/job/x", f"{sandbox.TMP}/x", "/proc", "/usr", "/", "relative", "/dev/x"]
)
def test_read_only_paths_cannot_cover_the_sandboxs_own(host, inside):
    spec = SandboxSpec(
        command=("/usr/bin/true",), work_folder=host.work, read_only={inside: host.code}
    )
    with pytest.raises(SandboxRefused):
        sandbox_start(spec)


def test_a_worker_without_bubblewrap_says_so():
    reason = sandbox_check(bwrap="/nonexistent/bwrap")
    assert reason == (
        f"bubblewrap is not installed on worker {socket.gethostname()}; own-code jobs need it "
        "(apt-get install bubblewrap)."
    )


@pytest.mark.slow
def test_a_worker_where_bubblewrap_cannot_make_namespaces_says_why(host):
    """What bubblewrap says in a container without user namespaces, through a stand-in."""
    fake = host.code / "bwrap"
    fake.write_text(
        "#!/bin/sh\necho 'bwrap: No permissions to creating new namespace, likely because the "
        "kernel does not allow non-privileged user namespaces.' >&2\nexit 1\n"
    )
    fake.chmod(0o755)

    reason = sandbox_check(bwrap=str(fake))

    assert reason.startswith(f"bubblewrap on worker {socket.gethostname()} cannot build a sandbox")
    assert "No permissions to creating new namespace" in reason
    assert reason.endswith(
        "own-code jobs need it, with unprivileged user namespaces allowed "
        "(a kernel or container that permits them)."
    )


@pytest.mark.slow
def test_the_child_sees_only_its_folder_at_a_fixed_place_and_a_clean_environment(runtime, host):
    script = r"""
import json, os
print(json.dumps({"cwd": os.getcwd(), "home": os.environ["HOME"], "uid": os.getuid(),
                  "names": sorted(os.environ), "root": sorted(os.listdir("/")),
                  "hostname": os.uname().nodename}))
"""
    result = sandbox_run(_spec(runtime, host, script))

    seen = _report(result)
    assert seen["cwd"] == seen["home"] == WORK_FOLDER
    assert seen["uid"] == sandbox.INSIDE_UID and seen["hostname"] == "sandbox"
    assert set(seen["names"]) <= {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "USER",
        "LOGNAME",
        "PYTHONPATH",
        "PWD",
        "LC_CTYPE",
    }
    assert host.work.name not in json.dumps(result.events)
    assert "etc" not in seen["root"] and "root" not in seen["root"]


# The trusted parent decides the attempt and what is registered: a sandboxed child that claims
# another attempt, or another job, changes neither. The child is started in the sandbox in place
# of the parent's own child_start, so the real run_attempt reads its lines.

FORGED = r"""
import json, shutil, sys

plan = json.loads(sys.argv[1])
shutil.copyfile("/code/weights.safetensors", "output/model.safetensors")
with open("output/config.json", "w") as handle:
    handle.write('{"layers": 1}')
for line in plan["lines"]:
    print(line, flush=True)
"""


@pytest.mark.django_db
@pytest.mark.slow
def test_a_sandboxed_child_claiming_another_attempt_or_job_changes_neither(
    runtime, host, local_storage, org, other_org, owner, settings, monkeypatch, tmp_path
):
    # A work root the sandbox's user may pass through but not list, as the image lays it out.
    attempts = host.root / "attempts"
    attempts.mkdir(mode=0o1733)
    if os.geteuid() == 0:
        os.chown(attempts, sandbox.SANDBOX_UID, sandbox.SANDBOX_GID)
    settings.WORKER_WORKDIR = str(attempts)
    (host.code / "weights.safetensors").write_bytes(
        save_safetensors({"linear.weight": np.ones((2, 3), dtype=np.float32)})
    )
    rows = tmp_path / "points.csv"
    rows.write_bytes(_separable_csv(50))
    actor = Actor(user=owner)
    dataset = dataset_version_create(
        dataset=dataset_create(organization=org, name="points", actor=actor),
        path=rows,
        filename="points.csv",
        actor=actor,
    )
    other_job = JobFactory(organization=other_org)
    job = JobFactory(organization=org, input_dataset_version=dataset)
    claims = {"attempt": 7, "job": other_job.pk, "job_id": other_job.pk}
    lines = [
        format_line("metric", {"step": 1, "name": "loss", "value": 0.5, "split": "train"})[:-1]
        + f', "attempt": 7, "job": {other_job.pk}}}',
        f'@@attempt {{"number": 7, "job": {other_job.pk}}}',
        f"@@result-for {json.dumps(claims)}",
        "@@result "
        + json.dumps(
            {
                "metrics": {"accuracy": 1.0},
                "artifacts": {
                    "model.safetensors": "output/model.safetensors",
                    "config.json": "output/config.json",
                },
                "input_signature": {},
                "parameters": {},
                **claims,
            }
        ),
    ]
    plan = json.dumps({"lines": lines})
    (host.code / "attack.py").write_text(FORGED)

    def start_in_sandbox(*, workdir, cuda_visible_devices, threads):
        """The parent's child_start, in a sandbox: started in its folder, nothing to hand over."""
        return sandbox_start(
            SandboxSpec(
                command=(runtime.interpreter, "/code/attack.py", plan),
                work_folder=workdir,
                read_only={**runtime.read_only, "/code": host.code},
                environment=runtime.environment,
                limits=Limits(wall_clock_s=60, memory_bytes=1024 * MB, processes=64),
            )
        ), None

    monkeypatch.setattr(parent, "child_start", start_in_sandbox)
    worker = worker_register(name=f"cpu-{os.urandom(3).hex()}", devices=[])
    scheduler_pass()

    assert run_attempt(job_id=job.pk, attempt=1, worker_id=worker.pk) == "succeeded"

    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED and job.attempt == 1
    assert list(JobAttempt.objects.filter(job=job).values_list("number", flat=True)) == [1]
    assert set(JobMetric.objects.filter(job=job).values_list("attempt", flat=True)) == {1}
    assert set(job.logs.values_list("attempt", flat=True)) == {1}
    assert not JobMetric.objects.filter(job=other_job).exists() and not other_job.logs.exists()
    assert set(
        UsageRecord.objects.filter(source_id=str(job.pk)).values_list("idempotency_key", flat=True)
    ) == {f"job:{job.pk}:attempt:1"}
    version = ModelVersion.objects.get(pk=job.output_model_version_id)
    assert version.source_job_id == job.pk and version.registered_model.organization == org
    assert not list(attempts.iterdir())  # the parent removed the attempt's folder
