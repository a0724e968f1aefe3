"""Run a tenant's command inside a bubblewrap sandbox, and end it when it oversteps a limit.

The sandbox is the boundary own-code jobs run behind (docs/reliability.md, "The sandbox for
tenants' own code"): its own user, PID, IPC, UTS, network and cgroup namespaces, no nested user
namespace, a new session, a root file system that holds only the system's programs and libraries
(/usr), the read-only paths the caller names (the Python runtime, the code) and one private work
folder, a clean environment, and limits on wall clock, memory, processes, open files and the work
folder's size.

This module knows nothing of jobs or Django: the caller (the worker, later the own-code runner)
prepares the work folder, names what the child may read, and reads the child's stdout and stderr
as it reads a recipe child's (jobs.runner.protocol). Nothing the child prints changes what the
sandbox does; the parent decides attempts, outputs and limits.

How each limit is held, and why:

- Processes, open files, file size, core dumps (and the address space when no GPU is assigned):
  setrlimit, through util-linux `prlimit` run as the sandbox's first program, after bubblewrap
  made the namespaces. Linux counts RLIMIT_NPROC per user namespace (since 5.14), so set there it
  counts only this sandbox's tasks (threads included); set before, on bubblewrap itself, it would
  also count every other sandbox of the same user. The kernel never applies RLIMIT_NPROC to root,
  so a worker running as root starts the sandbox as SANDBOX_UID instead.
- Memory: RLIMIT_AS refuses any allocation past the limit (a CPU sandbox). CUDA reserves far more
  address space than it uses, so a sandbox with GPUs has no RLIMIT_AS, and the parent's watchdog
  holds the limit for both: it sums the resident memory of the sandbox's processes every
  POLL_S and kills the sandbox once that (confirmed by the proportional set size, which does not
  count shared pages twice) is over the limit. /tmp and /dev/shm are tmpfs of `tmp_bytes` each,
  outside that count.
- Work folder: measured by the parent (every DISK_POLL_S or more, so a large folder's walk costs
  at most about 5% of a core), counting allocated blocks and entries and following no link; the
  sandbox is killed once it is over. RLIMIT_FSIZE bounds any one file to the folder's limit, so
  a single write cannot outrun the walk by more than that. No loop device or tmpfs: the folder
  survives the child, so the parent can read its outputs.
- Wall clock: from the parent. SIGTERM to every process in the sandbox, then, after the grace,
  SIGKILL to the sandbox's PID 1, which ends every process in its PID namespace at once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import protocol

BWRAP = "bwrap"
PRLIMIT = "/usr/bin/prlimit"
# Where the work folder appears inside, whatever its name outside (which nobody may learn).
WORK_FOLDER = "/job"
# The sandbox's user when the worker runs as root (nobody): an unprivileged user outside, so that
# RLIMIT_NPROC applies and nothing the child does acts as root on the host.
SANDBOX_UID = SANDBOX_GID = 65534
# The child's uid and gid inside, the same on every worker.
INSIDE_UID = INSIDE_GID = 1000
# The sandbox's own tmpfs, not the host's folders.
TMP = "/tmp"  # noqa: S108
SHM = "/dev/shm"  # noqa: S108
# Places the sandbox lays out itself: no read-only path may go there.
RESERVED = (WORK_FOLDER, TMP, "/proc", "/dev", "/usr")
# The merged-/usr links (or folders, on a system without merged /usr).
SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
POLL_S = 0.1
DISK_POLL_S = 0.25
DISK_WALK_SHARE = 20  # the next walk waits at least this many times the last one's duration
MAX_FOLDER_DEPTH = 128
# A line longer than this reaches the parser in pieces: the parent's memory stays bounded.
MAX_LINE_CHARS = 64 * 1024
MB = 1024 * 1024
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SandboxRefused(ValueError):
    """The caller asked for a sandbox that would not hold (a path it cannot or must not bind)."""


@dataclass(frozen=True)
class Limits:
    wall_clock_s: float = 3600.0
    memory_bytes: int = 4096 * MB
    # Tasks: processes and their threads (torch starts one per core and more).
    processes: int = 512
    open_files: int = 1024
    work_folder_bytes: int = 10 * 1024 * MB
    work_folder_entries: int = 100_000
    tmp_bytes: int = 256 * MB  # /tmp and /dev/shm, each
    stop_grace_s: float = 10.0


@dataclass(frozen=True)
class SandboxSpec:
    """What to run and what it may touch.

    `read_only` maps a path inside to the path outside that appears there, read-only (the
    runtime, the code); `devices` are device nodes bound as they are (the GPUs assigned: their
    /dev/nvidiaN and the control nodes), and any device makes the sandbox a GPU one for the
    memory limit. `environment` is the child's whole environment beyond PATH, HOME, LANG,
    TMPDIR, USER and LOGNAME: nothing of the parent's is passed on.
    """

    command: tuple[str, ...]
    work_folder: Path
    read_only: Mapping[str, Path] = field(default_factory=dict)
    devices: tuple[str, ...] = ()
    environment: Mapping[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    # Descriptors the child inherits as they are numbered here: a replica's end of the socket
    # pair its parent talks to it over (the sandbox has no network).
    pass_fds: tuple[int, ...] = ()


@dataclass(frozen=True)
class Runtime:
    """A Python interpreter the sandbox can run: what to bind and what the child's environment
    needs to find its packages."""

    interpreter: str
    read_only: dict[str, Path]
    environment: dict[str, str]


def python_runtime(
    interpreter: str = sys.executable, *, site_packages: Sequence[Path] = ()
) -> Runtime:
    """The interpreter's installation (and virtual environment), read-only at the same paths,
    plus `site_packages` on PYTHONPATH (packages of another installation of the same Python
    version, such as the in-job library's)."""
    prefixes = _interpreter_prefixes(interpreter)
    read_only = {
        str(path): path
        for path in map(Path, prefixes)
        if not _under(str(path), "/usr") and str(path) != "/"
    }
    for folder in site_packages:
        read_only[str(folder)] = Path(folder)
    folders = [str(Path(interpreter).parent), "/usr/local/bin", "/usr/bin", "/bin"]
    environment = {"PATH": ":".join(dict.fromkeys(folders))}
    if site_packages:
        environment["PYTHONPATH"] = ":".join(map(str, site_packages))
    return Runtime(interpreter=interpreter, read_only=read_only, environment=environment)


@functools.cache
def _interpreter_prefixes(interpreter: str) -> tuple[str, ...]:
    if os.path.realpath(interpreter) == os.path.realpath(sys.executable):
        return (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    shown = subprocess.run(
        [
            interpreter,
            "-I",
            "-c",
            "import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, "
            "sys.exec_prefix, sys.base_exec_prefix]))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    return tuple(json.loads(shown.stdout))


def runtime_refusal(runtime: Runtime) -> str | None:
    """Why the sandbox's user could not read `runtime` on this worker, or None: a worker that runs
    as root starts sandboxes as SANDBOX_UID, which may not reach an interpreter installed under
    root's home."""
    user = _sandbox_user()
    if user is None:
        return None
    try:
        for outside in runtime.read_only.values():
            _check_reachable(outside, user)
        _check_reachable(Path(runtime.interpreter), user)
    except SandboxRefused as exc:
        return str(exc)
    return None


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# --- availability ------------------------------------------------------------------------------


def sandbox_check(*, bwrap: str = BWRAP) -> str | None:
    """None when this machine can run sandboxes, else why not, in words a person can act on.

    Builds and runs a real, small sandbox (namespaces, /proc, the limits), since bubblewrap may be
    installed where it cannot create namespaces (a container without user namespaces, a kernel
    that refuses them to unprivileged users).
    """
    host = socket.gethostname()
    if shutil.which(bwrap) is None:
        return (
            f"bubblewrap is not installed on worker {host}; own-code jobs need it "
            "(apt-get install bubblewrap)."
        )
    if not os.access(PRLIMIT, os.X_OK):
        return f"prlimit (util-linux) is missing on worker {host}; own-code jobs need it."
    with tempfile.TemporaryDirectory(prefix="sandbox-check-") as folder:
        spec = SandboxSpec(
            command=("/usr/bin/true",),
            work_folder=Path(folder),
            limits=Limits(wall_clock_s=30, memory_bytes=256 * MB, processes=16),
        )
        try:
            result = sandbox_run(spec, bwrap=bwrap)
        except (OSError, SandboxRefused) as exc:
            return f"bubblewrap cannot start on worker {host} ({exc}); own-code jobs need it."
    if result.ending.exit_code == 0:
        return None
    said = next((line for line in result.stderr if line.strip()), result.ending.reason)
    return (
        f"bubblewrap on worker {host} cannot build a sandbox here ({said}); own-code jobs need "
        "it, with unprivileged user namespaces allowed (a kernel or container that permits them)."
    )


@functools.cache
def sandbox_unavailable_reason() -> str | None:
    """`sandbox_check()`, once per process: a worker asks before it takes an own-code job."""
    return sandbox_check()


# --- the sandbox's arguments -------------------------------------------------------------------


def _sandbox_user() -> tuple[int, int] | None:
    """(uid, gid) to start bubblewrap as, or None for the worker's own user."""
    return (SANDBOX_UID, SANDBOX_GID) if os.geteuid() == 0 else None


def _check_spec(spec: SandboxSpec, user: tuple[int, int] | None) -> None:
    if not spec.command:
        raise SandboxRefused("The sandbox needs a command to run.")
    if not spec.work_folder.is_dir() or spec.work_folder.is_symlink():
        raise SandboxRefused(f"The work folder {spec.work_folder} is not a folder.")
    if user is not None:
        _check_reachable(spec.work_folder.parent, user)
    for inside, outside in spec.read_only.items():
        if not inside.startswith("/") or inside == "/" or "/../" in f"{inside}/":
            raise SandboxRefused(f"{inside!r} is not an absolute path to bind at.")
        clash = next((place for place in RESERVED if _under(inside, place)), None)
        if clash is not None or any(_under(place, inside) for place in RESERVED):
            raise SandboxRefused(f"{inside} would cover or lie in {clash or 'a sandbox folder'}.")
        if not Path(outside).exists():
            raise SandboxRefused(f"{outside} (to appear at {inside}) does not exist.")
        if user is not None:
            _check_reachable(Path(outside), user)
    for device in spec.devices:
        if not device.startswith("/dev/") or not stat.S_ISCHR(os.stat(device).st_mode):
            raise SandboxRefused(f"{device} is not a character device under /dev.")
    for name, value in spec.environment.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise SandboxRefused(f"{name!r} is not an environment variable a child can get.")


def _check_reachable(path: Path, user: tuple[int, int]) -> None:
    """Refuse, naming the folder, a path the sandbox's user could not read: bubblewrap would fail
    with a bare "Permission denied"."""
    uid, gid = user
    real = Path(os.path.realpath(path))
    for folder in [*reversed(real.parents), real]:
        info = os.stat(folder)
        needed = 0o1 if stat.S_ISDIR(info.st_mode) else 0o4
        if info.st_uid == uid:
            allowed = info.st_mode >> 6
        elif info.st_gid == gid:
            allowed = info.st_mode >> 3
        else:
            allowed = info.st_mode
        if not allowed & needed:
            raise SandboxRefused(
                f"The sandbox's user {uid} cannot reach {path}: {folder} is closed to other "
                f"users (mode {stat.S_IMODE(info.st_mode):o}): it must be open to it (the "
                "runtime readable, the work root passable)."
            )


def _system_arguments() -> list[str]:
    arguments = ["--ro-bind", "/usr", "/usr"]
    for place in SYSTEM_LINKS:
        if os.path.islink(place):
            arguments += ["--symlink", os.readlink(place), place]
        elif os.path.isdir(place):
            arguments += ["--ro-bind", place, place]
    return arguments


def _limit_arguments(limits: Limits, *, gpus: bool) -> list[str]:
    def both(value: int) -> str:
        return f"{value}:{value}"

    arguments = [
        PRLIMIT,
        f"--nproc={both(limits.processes)}",
        f"--nofile={both(limits.open_files)}",
        f"--fsize={both(limits.work_folder_bytes)}",
        "--core=0:0",
    ]
    if not gpus:
        arguments.append(f"--as={both(limits.memory_bytes)}")
    return [*arguments, "--"]


def bwrap_arguments(spec: SandboxSpec, *, info_fd: int | None = None) -> list[str]:
    """bubblewrap's options for `spec`, in the order it applies them (later mounts go over
    earlier ones); the command follows them (`sandbox_command`)."""
    limits = spec.limits
    environment = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": WORK_FOLDER,
        "TMPDIR": TMP,
        "LANG": "C.UTF-8",
        "USER": "sandbox",
        "LOGNAME": "sandbox",
        **spec.environment,
    }
    arguments = [
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--uid",
        str(INSIDE_UID),
        "--gid",
        str(INSIDE_GID),
        "--hostname",
        "sandbox",
        "--clearenv",
    ]
    for name, value in environment.items():
        arguments += ["--setenv", name, value]
    arguments += _system_arguments()
    for inside, outside in spec.read_only.items():
        arguments += ["--ro-bind", str(outside), inside]
    arguments += ["--proc", "/proc", "--dev", "/dev"]
    for device in spec.devices:
        arguments += ["--dev-bind", device, device]
    arguments += [
        "--size",
        str(limits.tmp_bytes),
        "--tmpfs",
        SHM,
        "--size",
        str(limits.tmp_bytes),
        "--tmpfs",
        TMP,
        "--bind",
        str(spec.work_folder),
        WORK_FOLDER,
        # bubblewrap's own tmpfs (the root, /dev) would otherwise be writable without limit.
        "--remount-ro",
        "/dev",
        "--remount-ro",
        "/",
        "--chdir",
        WORK_FOLDER,
    ]
    if info_fd is not None:
        arguments += ["--info-fd", str(info_fd)]
    return arguments


def sandbox_command(spec: SandboxSpec) -> list[str]:
    """What the sandbox runs: the limits, then the caller's command."""
    return [*_limit_arguments(spec.limits, gpus=bool(spec.devices)), *spec.command]


def sandbox_hand_over(work_folder: Path) -> None:
    """Give the sandbox's user what the parent wrote into a started sandbox's work folder (the
    inputs of a job handed to a sandbox started ahead of it), as sandbox_start does at start."""
    user = _sandbox_user()
    if user is not None:
        _hand_over(work_folder, user)


def _hand_over(work_folder: Path, user: tuple[int, int]) -> None:
    """Give the folder the parent prepared (inputs included) to the sandbox's user."""
    uid, gid = user
    os.chown(work_folder, uid, gid, follow_symlinks=False)
    for folder, folders, files in os.walk(work_folder):
        for name in folders + files:
            os.chown(os.path.join(folder, name), uid, gid, follow_symlinks=False)


# --- the running sandbox -----------------------------------------------------------------------


@dataclass(frozen=True)
class Ending:
    """How the sandbox ended. `limit` names the limit that ended it (wall_clock, memory,
    processes, work_folder, file_size), None when it exited on its own or was stopped on
    request; `reason` says it for a person."""

    exit_code: int | None
    limit: str | None
    reason: str
    stopped: bool = False

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and self.limit is None and not self.stopped


class SandboxedProcess:
    """A started sandbox: `stdout` and `stderr` are the child's text streams, read by the caller
    as it reads a recipe child's; a watchdog thread holds the limits; `stop()` asks it to end
    (SIGTERM, then SIGKILL after the grace), `kill()` ends it now, `ending()` says how it ended.
    """

    def __init__(self, spec: SandboxSpec, popen: subprocess.Popen, init_pid: int | None):
        self.spec, self.popen, self.init_pid = spec, popen, init_pid
        # A PID names the sandbox's PID 1 only while it lives: its start time tells it from a
        # later process given the same number.
        self._init_started = _started_at(init_pid) if init_pid is not None else None
        self.stdout, self.stderr = popen.stdout, popen.stderr
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._violation: tuple[str, str] | None = None
        self._stopped = False
        self._kill_at: float | None = None
        self._ignored_term = False
        self._watchdog = threading.Thread(target=self._watch, daemon=True, name="sandbox-watch")
        self._watchdog.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """The child's exit code, once every process of the sandbox is gone."""
        code = self.popen.wait(timeout)
        self._watchdog.join()
        self._until_init_is_gone()
        return code

    def _init_alive(self) -> bool:
        if self.init_pid is None:
            return False
        try:
            fields = _stat_fields(self.init_pid)
        except (OSError, ValueError):
            return False
        return fields[0] not in ("Z", "X") and int(fields[19]) == self._init_started

    def _until_init_is_gone(self) -> None:
        """bubblewrap reports the child's exit status before its PID 1 has finished exiting, and
        PID 1's exit is what ends the namespace's other processes (a child's own children):
        wait for it, so that nothing of the sandbox still runs, or writes to the work folder,
        once wait() returns."""
        deadline = time.monotonic() + 30
        while self._init_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise RuntimeError(f"The sandbox's PID 1 ({self.init_pid}) did not exit.")
            time.sleep(0.001)  # an exiting process has no handle to wait on but its /proc entry

    def send_signal(self, signum: int) -> None:
        """As Popen.send_signal, for a caller written for a plain child: the signal goes to every
        process of the sandbox (as to a process group), SIGKILL to the whole sandbox."""
        if signum == signal.SIGKILL:
            self.kill()
            return
        for pid in self.processes()[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(self) -> None:
        """Ask the child to end: SIGTERM now, SIGKILL to the whole sandbox after the grace."""
        with self._lock:
            self._stopped = self._stopped or self._violation is None
        self._terminate()

    def kill(self) -> None:
        """End every process of the sandbox now."""
        if self.popen.poll() is not None:
            return
        if self._init_alive():
            # PID 1 of the sandbox's namespace: the kernel ends every process in it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        else:  # not cloned yet: bubblewrap takes its child with it (--die-with-parent)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)

    def processes(self) -> list[int]:
        """The sandbox's processes, its PID 1 first (none once it has ended)."""
        if not self._init_alive():
            return []
        return _process_tree(self.init_pid)

    def ending(self) -> Ending:
        """How it ended; call after wait()."""
        code = self.popen.returncode
        limits = self.spec.limits
        if self._violation is not None:
            limit, reason = self._violation
            if limit == "wall_clock" and self._ignored_term:
                reason += f" (it did not stop within {limits.stop_grace_s:g} s of SIGTERM)"
            return Ending(exit_code=code, limit=limit, reason=f"killed: {reason}")
        if self._stopped:
            return Ending(exit_code=code, limit=None, reason="stopped on request", stopped=True)
        if code is not None and code == 128 + signal.SIGXFSZ:
            return Ending(
                exit_code=code,
                limit="file_size",
                reason=(
                    f"killed: file size limit {_size(limits.work_folder_bytes)} reached "
                    "(a file may not outgrow the work folder's limit)"
                ),
            )
        if code == 0:
            return Ending(exit_code=0, limit=None, reason="exited")
        if code is not None and code > 128:
            try:
                name = signal.Signals(code - 128).name
            except ValueError:
                name = f"signal {code - 128}"
            return Ending(exit_code=code, limit=None, reason=f"failed: exit code {code} ({name}?)")
        return Ending(exit_code=code, limit=None, reason=f"failed: exit code {code}")

    def _terminate(self) -> None:
        with self._lock:
            if self._kill_at is not None:
                return
            self._kill_at = time.monotonic() + self.spec.limits.stop_grace_s
        self.send_signal(signal.SIGTERM)

    def _violate(self, limit: str, reason: str, *, grace: bool = False) -> None:
        with self._lock:
            if self._violation is None and not self._stopped:
                self._violation = (limit, reason)
        if grace:
            self._terminate()
        else:
            self.kill()

    def rearm(self, limits: Limits) -> None:
        """Hold `limits` from now on, the wall clock counted from now: a sandbox started ahead of
        its job gets that job's clock and grace when the job is handed to it. Only the limits the
        watchdog holds may change; the others were set in the sandbox when it started."""
        held_inside = {"wall_clock_s": 0.0, "stop_grace_s": 0.0}
        if replace(limits, **held_inside) != replace(self.spec.limits, **held_inside):
            raise SandboxRefused("Only the wall clock and the grace of a started sandbox change.")
        with self._lock:
            self.spec = replace(self.spec, limits=limits)
            self.started = time.monotonic()

    def _watch(self) -> None:
        next_disk = self.started
        while True:
            try:
                self.popen.wait(timeout=POLL_S)
                return
            except subprocess.TimeoutExpired:
                pass
            limits = self.spec.limits  # rearm() may have changed them
            now = time.monotonic()
            if self._kill_at is not None and now >= self._kill_at:
                self._ignored_term = True
                self.kill()
                continue
            if now - self.started > limits.wall_clock_s:
                self._violate(
                    "wall_clock", f"wall-clock limit {limits.wall_clock_s:g} s", grace=True
                )
            tasks, resident = _tasks_and_memory(self.processes())
            if tasks >= limits.processes:
                self._violate("processes", f"process limit {limits.processes} reached")
            elif resident > limits.memory_bytes and self._over_memory():
                self._violate("memory", f"memory limit {_size(limits.memory_bytes)} exceeded")
            if now >= next_disk:
                verdict, took = self._work_folder_verdict()
                if verdict is not None:
                    self._violate("work_folder", verdict)
                next_disk = now + max(DISK_POLL_S, DISK_WALK_SHARE * took)

    def _over_memory(self) -> bool:
        """Resident memory counts a page shared by two processes twice: confirm with the
        proportional set size, where the kernel lets us read it."""
        total = 0
        for pid in self.processes():
            try:
                rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                return True  # made itself unreadable: resident memory is all there is
            total += next(
                (int(line.split()[1]) * 1024 for line in rollup.splitlines() if line[:4] == "Pss:"),
                0,
            )
        return total > self.spec.limits.memory_bytes

    def _work_folder_verdict(self) -> tuple[str | None, float]:
        limits = self.spec.limits
        began = time.monotonic()
        try:
            used, entries = work_folder_usage(
                self.spec.work_folder, max_entries=limits.work_folder_entries
            )
        except FolderTooDeep:
            return f"work folder nested deeper than {MAX_FOLDER_DEPTH} folders", 0.0
        except OSError as exc:
            return f"work folder could not be measured ({exc.strerror})", 0.0
        took = time.monotonic() - began
        if entries > limits.work_folder_entries:
            return f"work folder limit {limits.work_folder_entries} files exceeded", took
        if used > limits.work_folder_bytes:
            return f"work folder limit {_size(limits.work_folder_bytes)} exceeded", took
        return None, took


def sandbox_start(spec: SandboxSpec, *, bwrap: str = BWRAP) -> SandboxedProcess:
    """Start `spec.command` in a new sandbox and return at once.

    Call it from a thread that outlives the sandbox: bubblewrap dies with the thread that started
    it (--die-with-parent), and the sandbox with it.
    """
    user = _sandbox_user()
    _check_spec(spec, user)
    if user is not None:
        _hand_over(spec.work_folder, user)
    info_read, info_write = os.pipe()
    # The options travel in a file, not the command line: /proc/<pid>/cmdline is readable by
    # every user, and the work folder's name is a secret. (bubblewrap takes the command itself
    # from its command line; it names only paths inside.)
    with tempfile.TemporaryFile() as arguments:
        arguments.write(
            "\0".join(bwrap_arguments(spec, info_fd=info_write)).encode() + b"\0",
        )
        arguments.flush()
        arguments.seek(0)
        try:
            popen = subprocess.Popen(
                [bwrap, "--args", str(arguments.fileno()), "--", *sandbox_command(spec)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",  # the child may print bytes that are not UTF-8
                bufsize=1,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                pass_fds=(arguments.fileno(), info_write, *spec.pass_fds),
                start_new_session=True,
                **(
                    {"user": user[0], "group": user[1], "extra_groups": []}
                    if user is not None
                    else {}
                ),
            )
        finally:
            os.close(info_write)
    try:
        init_pid = _read_init_pid(info_read)
    finally:
        os.close(info_read)
    return SandboxedProcess(spec, popen, init_pid)


def _read_init_pid(info: int) -> int | None:
    """The sandbox's PID 1, as bubblewrap reports it once it has cloned it (None if it failed
    before)."""
    text = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([info], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(info, 4096)
        if not chunk:
            break
        text += chunk
    try:
        return int(json.loads(text)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


# --- reading /proc and the work folder ---------------------------------------------------------


def _started_at(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[19])
    except (OSError, IndexError, ValueError):
        return None


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from its state on (the name before it may hold spaces)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def _process_tree(root: int) -> list[int]:
    """`root` and its descendants. A child made by any thread is listed under that thread."""
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for thread in threads:
            with contextlib.suppress(OSError, ValueError):
                children = Path(f"/proc/{pid}/task/{thread}/children").read_text().split()
                pending.extend(map(int, children))
    return found


def _tasks_and_memory(pids: Sequence[int]) -> tuple[int, int]:
    """Threads and resident bytes of the processes, from /proc/<pid>/stat."""
    tasks = resident = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for pid in pids:
        try:
            fields = _stat_fields(pid)
        except (OSError, ValueError):
            continue
        tasks += int(fields[17])
        resident += int(fields[21]) * page
    return tasks, resident


class FolderTooDeep(Exception):
    pass


def work_folder_usage(folder: Path, *, max_entries: int) -> tuple[int, int]:
    """(bytes allocated, entries) under `folder`, stopping once past `max_entries`.

    Each folder is opened relative to the one holding it, never through a link, so a child that
    swaps a folder for a link to the host's / cannot make the parent walk it.
    """
    used = entries = 0
    top = os.open(folder, _DIRECTORY_FLAGS)
    stack = [(top, os.scandir(top))]
    try:
        while stack:
            handle, listing = stack[-1]
            entry = next(listing, None)
            if entry is None:
                listing.close()
                os.close(handle)
                stack.pop()
                continue
            entries += 1
            if entries > max_entries:
                break
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            used += info.st_blocks * 512
            if not stat.S_ISDIR(info.st_mode):
                continue
            if len(stack) >= MAX_FOLDER_DEPTH:
                raise FolderTooDeep(entry.name)
            try:
                inner = os.open(entry.name, _DIRECTORY_FLAGS, dir_fd=handle)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed, or swapped for a file or a link, since it was listed
            except OSError as exc:
                if exc.errno == 40:  # ELOOP: a link now, not followed
                    continue
                raise
            stack.append((inner, os.scandir(inner)))
    finally:
        for handle, listing in stack:
            listing.close()
            os.close(handle)
    return used, entries


def _size(amount: int) -> str:
    return f"{amount / MB:g} MB" if amount < 1024 * MB else f"{amount / (1024 * MB):g} GB"


# --- running to the end ------------------------------------------------------------------------


@dataclass
class SandboxResult:
    ending: Ending
    # Each stdout line as the protocol parser read it: ("metric", {...}), ("log", "text"), ...
    events: list[tuple[str, Any]]
    stderr: list[str]
    duration_s: float


def read_lines(stream, *, max_chars: int = MAX_LINE_CHARS):
    """The stream's lines without their newline, a line longer than `max_chars` in pieces."""
    for line in iter(lambda: stream.readline(max_chars), ""):
        yield line.removesuffix("\n")


def sandbox_run(spec: SandboxSpec, *, bwrap: str = BWRAP) -> SandboxResult:
    """Run `spec` to its end. Every stdout line goes, unchanged, to `protocol.parse_line`."""
    process = sandbox_start(spec, bwrap=bwrap)
    lines: queue.Queue[tuple[str, str] | None] = queue.Queue()

    def pump(stream_name: str, stream) -> None:
        try:
            for line in read_lines(stream):
                lines.put((stream_name, line))
        finally:
            lines.put(None)

    pumps = [
        threading.Thread(target=pump, args=(name, stream), daemon=True)
        for name, stream in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    for thread in pumps:
        thread.start()
    events: list[tuple[str, Any]] = []
    stderr: list[str] = []
    open_streams = len(pumps)
    while open_streams:
        item = lines.get()
        if item is None:
            open_streams -= 1
            continue
        stream_name, line = item
        if stream_name == "stdout":
            events.append(protocol.parse_line(line))
        else:
            stderr.append(line)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    return SandboxResult(
        ending=_with_refusals(process.ending(), stderr, spec.limits),
        events=events,
        stderr=stderr,
        duration_s=time.monotonic() - process.started,
    )


# What a child says when a limit refused it something rather than killing it: Python ignores
# SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG; RLIMIT_AS makes allocations fail.
REFUSALS = {
    "memory": ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory"),
    "file_size": ("File too large",),
}


def _with_refusals(ending: Ending, stderr: Sequence[str], limits: Limits) -> Ending:
    """The limit a failed child was refused by, when its last words say so."""
    if ending.limit is not None or ending.exit_code in (0, None) or ending.stopped:
        return ending
    said = "\n".join(stderr[-20:])
    for limit, words in REFUSALS.items():
        if any(word in said for word in words):
            amount = limits.memory_bytes if limit == "memory" else limits.work_folder_bytes
            what = "an allocation" if limit == "memory" else "a write"
            return Ending(
                exit_code=ending.exit_code,
                limit=limit,
                reason=(
                    f"failed: {limit.replace('_', ' ')} limit {_size(amount)} reached ({what} "
                    f"was refused; exit code {ending.exit_code})"
                ),
            )
    return ending
