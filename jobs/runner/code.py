"""The parent's side of an own-code attempt: the package's files, the sandbox it runs in, and the
checks on every line it prints.

A tenant's package runs only under jobs.runner.sandbox, with the in-job library (`factory_job`)
and the package's files read-only, and one work folder writable. What it prints is hostile: a
structured line (`@@kind {...}`) must match the protocol's schema exactly, with no field the
protocol does not define, and a kind the package may print; anything else that looks like one
refuses the attempt, saying which line and why.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import stat
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

import factory_job
from factory_job import channel as job_channel
from jobs.recipes.base import RecipeInputError
from registry.formats.archives import check_entry, check_entry_path
from registry.formats.base import DatasetLimits
from registry.formats.code_packages import check_tar_member, inspect_code_package

from . import protocol
from .isolation import staging_folder_create
from .sandbox import (
    MB,
    WORK_FOLDER,
    Limits,
    Runtime,
    SandboxedProcess,
    SandboxSpec,
    sandbox_hand_over,
    sandbox_start,
)

# Where the package's files and the in-job library appear inside the sandbox.
CODE_FOLDER = "/code"
LIBRARY_FOLDER = "/opt/factory"
JOB_FILE = "job.json"
# What a package may print; @@serving is a replica's, which own code does not run yet.
PACKAGE_LINE_KINDS = ("metric", "checkpoint", "progress", "result")
# The outputs a package may name in its @@result (factory_job.register_model/register_dataset).
ARTIFACT_NAMES = ("model.safetensors", "config.json", "dataset")
# What the parent keeps of one attempt's chatter: past these, lines are counted, not stored.
MAX_LOG_LINES = 20_000
MAX_METRICS = 100_000
MAX_METRIC_NAME = 100
_STRUCTURED = re.compile(r"^@@([A-Za-z][A-Za-z0-9_-]*) ")
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class PackageRefused(Exception):
    """The package did something the parent does not accept; the message says what, for a
    person."""


def _strict(schema: dict) -> dict:
    return {**schema, "additionalProperties": False}


_STRICT_SCHEMAS = {
    kind: _strict(protocol.LINE_SCHEMAS[kind]) for kind in ("metric", "checkpoint", "progress")
}
_STRICT_SCHEMAS["metric"]["properties"] = {
    **_STRICT_SCHEMAS["metric"]["properties"],
    "name": {"type": "string", "minLength": 1, "maxLength": MAX_METRIC_NAME},
}
_STRICT_SCHEMAS["result"] = _strict(
    {
        **protocol.LINE_SCHEMAS["result"],
        "properties": {
            "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
            "artifacts": {
                "type": "object",
                "propertyNames": {"enum": list(ARTIFACT_NAMES)},
                "additionalProperties": protocol.LINE_SCHEMAS["checkpoint"]["properties"]["path"],
            },
            "input_signature": {"type": "object"},
            "parameters": {"type": "object"},
        },
    }
)
_VALIDATORS = {kind: protocol.StrictValidator(schema) for kind, schema in _STRICT_SCHEMAS.items()}


def package_line(line: str) -> tuple[str, object]:
    """(kind, payload) of a line the package printed: a structured line it may print and that
    matches its schema exactly, or ("log", line) for any line that is not structured.

    Raises PackageRefused for a line that looks structured (`@@word {`) but is not one the
    package may print: an unknown kind (`@@attempt`), a field the protocol does not define (an
    "attempt" or "job" of its own choosing), an absolute or climbing path, a value of the
    wrong type.
    """
    line = line.rstrip("\r\n")
    match = _STRUCTURED.match(line)
    if match is None:
        return "log", line
    kind = match.group(1)
    shown = line if len(line) <= 200 else line[:200] + "..."
    if kind not in _VALIDATORS:
        raise PackageRefused(
            f"The package printed {shown!r}: @@{kind} is not a line a package may print "
            f"(only {', '.join('@@' + k for k in PACKAGE_LINE_KINDS)}); the worker alone "
            "decides the job and the attempt."
        )
    try:
        payload = json.loads(line[match.end() :], parse_constant=protocol._refuse_constant)
    except ValueError as exc:
        raise PackageRefused(
            f"The package printed a @@{kind} line that is not JSON ({exc})."
        ) from None
    error = next(_VALIDATORS[kind].iter_errors(payload), None)
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "the line"
        raise PackageRefused(
            f"The package printed a refused @@{kind} line ({where}: {error.message}): "
            f"{shown!r}. Paths must be files in its work folder, and the worker alone decides "
            "the job, the attempt and where outputs go."
        )
    return kind, payload


# --- the package's files -----------------------------------------------------------------------


def package_extract(archive: Path, target: Path, *, limits: DatasetLimits) -> None:
    """Unpack a verified package archive into the empty folder `target`, readable by every user
    and writable by none but the worker.

    The archive passed these checks when it was uploaded, and its sha256 was checked on download;
    they run again here (the registry's guards: names, links, bombs) because the worker, not the
    upload, is what writes the files out. Each file is created new (O_EXCL), through no link.
    """
    inspect_code_package(archive, limits=limits)
    with archive.open("rb") as file:
        head = file.read(2)
    if head == b"PK":
        with zipfile.ZipFile(archive) as bundle:
            for info in bundle.infolist():
                check_entry(info)
                with contextlib.ExitStack() as stack:
                    source = None if info.is_dir() else stack.enter_context(bundle.open(info))
                    _write_entry(target, info.filename, source)
    else:
        with tarfile.open(archive, mode="r|gz") as bundle:
            for member in bundle:
                check_tar_member(member)
                source = bundle.extractfile(member) if member.isfile() else None
                _write_entry(target, member.name, source)
    for folder, _folders, files in os.walk(target):
        os.chmod(folder, 0o755)  # noqa: S103 - the sandbox's user reads the code, never writes
        for name in files:
            os.chmod(os.path.join(folder, name), 0o644)


def _write_entry(target: Path, name: str, source) -> None:
    check_entry_path(name)
    parts = [part for part in PurePosixPath(name).parts if part not in ("", ".")]
    if not parts:
        return
    folder = target
    for part in parts[:-1] if source is not None else parts:
        folder = folder / part
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o755)
        if folder.is_symlink() or not folder.is_dir():
            raise PackageRefused(f"The package's {name!r} does not land in a folder.")
    if source is None:
        return
    descriptor = os.open(folder / parts[-1], _FILE_FLAGS, 0o644)
    with open(descriptor, "wb") as out:
        shutil.copyfileobj(source, out, length=MB)


# --- the sandbox -------------------------------------------------------------------------------


def library_folder() -> Path:
    """The folder holding the in-job library, bound read-only at LIBRARY_FOLDER."""
    return Path(factory_job.__file__).resolve().parent.parent


def gpu_devices(slot_indices: list[int]) -> tuple[str, ...]:
    """The device nodes of the GPUs assigned, plus the control nodes CUDA opens."""
    nodes = [f"/dev/nvidia{index}" for index in slot_indices]
    nodes += ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
    return tuple(
        node for node in nodes if os.path.exists(node) and stat.S_ISCHR(os.stat(node).st_mode)
    )


def package_sandbox_spec(
    *,
    runtime: Runtime,
    work_folder: Path,
    code_folder: Path,
    devices: tuple[str, ...],
    threads: int,
    limits: Limits,
    channel_fd: int | None = None,
    go_fd: int | None = None,
) -> SandboxSpec:
    """The sandbox an attempt runs in: the runtime, the code and the in-job library read-only,
    the work folder writable, and an environment of the runtime's paths and nothing else; a
    replica's also gets its end of the channel (`channel_fd`, factory_job.channel), and one
    started ahead of its job the pipe it waits on for its go (`go_fd`, WarmSandbox)."""
    python_path = [LIBRARY_FOLDER, CODE_FOLDER]
    if runtime.environment.get("PYTHONPATH"):
        python_path.append(runtime.environment["PYTHONPATH"])
    environment = {
        **runtime.environment,
        "PYTHONPATH": ":".join(python_path),
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        factory_job.SPEC_ENV: f"{WORK_FOLDER}/{JOB_FILE}",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    if channel_fd is not None:
        environment[job_channel.FD_ENV] = str(channel_fd)
    if go_fd is not None:
        environment[factory_job.GO_FD_ENV] = str(go_fd)
    passed = tuple(fd for fd in (channel_fd, go_fd) if fd is not None)
    return SandboxSpec(
        # -P: the work folder (the command's directory) is not put first on sys.path, so the
        # library and the code are what `import` finds.
        command=(
            runtime.interpreter,
            "-s",
            "-P",
            "-m",
            "factory_job",
            *((factory_job.WARM_FLAG,) if go_fd is not None else ()),
        ),
        work_folder=work_folder,
        read_only={
            **runtime.read_only,
            CODE_FOLDER: code_folder,
            f"{LIBRARY_FOLDER}/factory_job": library_folder() / "factory_job",
        },
        devices=devices,
        environment=environment,
        limits=limits,
        pass_fds=passed,
    )


def folder_empty(folder: Path) -> None:
    """Remove what `folder` holds, keeping the folder itself (a started sandbox has it bound)."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


# What a sandbox waiting for its job may run for: its wall clock until the job's replaces it.
WARM_WAIT_S = 7 * 24 * 3600.0


class WarmSandbox:
    """An own-code sandbox started before its job, so that the job does not wait for bubblewrap,
    the interpreter and the runtime's slow imports (docs/benchmarks.md).

    Nothing it is started with depends on the job: the worker's default runtime, a new private
    work folder and an empty code folder (both made for this sandbox alone, under the work
    root), no GPU, the slot's thread count, the default limits. The parent fills both folders
    when a job that fits arrives (`fits`), then hands it over (`go`): the job's wall clock
    starts, the folder goes to the sandbox's user, and the child reads its job file and runs the
    entry as a cold one does. It serves that one job; the next job gets a new sandbox and new
    folders. Until its go only the platform's code runs in it (factory_job waiting), so nothing
    of a tenant's is there while the parent writes.
    """

    def __init__(self, *, runtime: Runtime, root: Path, threads: int):
        self.runtime, self.threads = runtime, threads
        self.went = False
        self.work = staging_folder_create(root=root)
        self.code = Path(tempfile.mkdtemp(prefix=f"{self.work.name}-code-", dir=root))
        self.code.chmod(0o755)  # as a cold attempt's once extracted: the sandbox's user reads it
        go_read, self._go = os.pipe()
        try:
            self.process = sandbox_start(
                package_sandbox_spec(
                    runtime=runtime,
                    work_folder=self.work,
                    code_folder=self.code,
                    devices=(),
                    threads=threads,
                    limits=Limits(wall_clock_s=WARM_WAIT_S),
                    go_fd=go_read,
                )
            )
        except BaseException:
            os.close(self._go)
            self._remove_folders()
            raise
        finally:
            os.close(go_read)

    def fits(self, *, runtime: Runtime, threads: int, gpus: bool, serving: bool) -> bool:
        """Whether a job may run in this sandbox: one of the same runtime and thread count, on
        no GPU (device nodes are bound at start, a sandbox sees only its own job's GPUs, and a
        pool process does not know its next job's GPUs), and not a replica (its channel is made
        with it). Others start a sandbox cold."""
        return runtime == self.runtime and threads == self.threads and not gpus and not serving

    def alive(self) -> bool:
        return self.process.poll() is None

    def go(self, *, limits: Limits) -> SandboxedProcess:
        """Hand the job the parent wrote into `work` and `code` to the waiting child, under
        `limits` from now on; returns the running sandbox, which the caller now ends."""
        self.went = True
        self.process.rearm(limits)
        sandbox_hand_over(self.work)
        with contextlib.suppress(BrokenPipeError), open(self._go, "wb") as go:
            go.write(factory_job.GO)
        return self.process

    def end(self) -> None:
        """End it, unless it was handed a job (its attempt ends it then); its folders stay."""
        if self.went:
            return
        with contextlib.suppress(OSError):
            os.close(self._go)
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()
        self.process.stderr.close()

    def discard(self) -> None:
        """`end`, and remove its folders."""
        self.end()
        self._remove_folders()

    def _remove_folders(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.code, ignore_errors=True)


# --- predictions -------------------------------------------------------------------------------

# Rows per call of the package's predict in a batch job.
PREDICT_CHUNK_ROWS = 256
ROWS_FILE = "rows.jsonl"
# The most a replica's package may answer to one request; past it the request fails.
MAX_ANSWER_BYTES = 32 * MB
# What of a package's own words for a refused input reaches the caller.
MAX_ERROR_CHARS = 1000


def prediction_rows_write(
    dataset_path: Path,
    *,
    dataset_format: str,
    csv_dialect: dict | None,
    schema: list[dict],
    target: Path,
) -> int:
    """Write the dataset's rows as a batch job's package reads them: one JSON object per line,
    `{column: value}`, typed as the registry profiled the column (a CSV's cells cast to it; a
    missing cell is null); columns of a type JSON has no value for are left out. Returns the
    number of rows. One chunk in memory at a time, whatever the dataset's size."""
    from jobs.recipes.data import cast_column, read_table_chunks
    from registry.formats.csv_reader import CsvDialect

    if dataset_format not in ("csv", "parquet"):
        raise PackageRefused(
            f"A package's batch inference reads CSV or Parquet datasets, not {dataset_format}."
        )
    dtypes = {column["name"]: column["dtype"] for column in schema}
    dialect = CsvDialect.from_json(csv_dialect) if csv_dialect else None
    rows = 0
    with target.open("w", encoding="utf-8") as out:
        for table in read_table_chunks(
            dataset_path, dataset_format, chunk_rows=PREDICT_CHUNK_ROWS * 4, csv_dialect=dialect
        ):
            columns = [
                cast_column(column, dtypes[name], first_row=table.first_row)
                if dtypes.get(name) in ("int64", "float64", "bool")
                else column
                for name, column in table.columns.items()
            ]
            for index in range(table.row_count):
                row = {column.name: _json_value(column.values[index]) for column in columns}
                out.write(json.dumps(row, allow_nan=False, ensure_ascii=True) + "\n")
            rows += table.row_count
    return rows


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class ReplicaBroken(Exception):
    """The package in the sandbox broke the channel's contract or stopped answering; the replica
    is ended (a deployment's reconciler starts another)."""


class SandboxPredictor:
    """A replica's predictor for an own-code model: each call is one request frame to the
    package's predict entry in its sandbox, over the socket pair the worker handed it, and its
    answer checked as anything the package says is: at most MAX_ANSWER_BYTES of plain JSON, one
    output per input, in `timeout_s`. A package's BadInput is the tenant's own 400; anything
    else ends the replica (`broken` says why), since a package that broke its contract once
    cannot be trusted to answer the next request in step."""

    def __init__(self, channel: socket.socket, *, timeout_s: float, on_broken):
        self.channel, self.timeout_s, self.on_broken = channel, timeout_s, on_broken
        self.broken: str | None = None

    def ready(self) -> None:
        """Wait for the package's `{"ready": true}`: its model is loaded."""
        self.channel.settimeout(None)  # loading has the attempt's own limits, not a request's
        if self._receive() != {"ready": True}:
            self._break("The package's predict entry did not say it was ready.")

    def __call__(self, inputs: list) -> list:
        if self.broken is not None:
            raise ReplicaBroken(self.broken)
        self.channel.settimeout(self.timeout_s)
        try:
            job_channel.send(self.channel, {"inputs": inputs})
            answer = self._receive()
        except TimeoutError:
            self._break(f"The package did not answer a request within {self.timeout_s:g} s.")
        except OSError as exc:
            self._break(f"The package's channel failed ({exc}).")
        if isinstance(answer, dict) and set(answer) == {"outputs"}:
            outputs = answer["outputs"]
            if isinstance(outputs, list) and len(outputs) == len(inputs):
                return outputs
            self._break(
                f"The package answered {len(inputs)} inputs with other than a list of "
                f"{len(inputs)} outputs."
            )
        if (
            isinstance(answer, dict)
            and set(answer) == {"error", "bad_input"}
            and isinstance(answer["error"], str)
        ):
            if answer["bad_input"] is True:
                raise RecipeInputError(answer["error"][:MAX_ERROR_CHARS])
            raise RuntimeError("The package's predict failed on this request.")
        self._break("The package answered with something other than outputs or an error.")

    def _receive(self):
        try:
            answer = job_channel.receive(self.channel, max_bytes=MAX_ANSWER_BYTES)
        except job_channel.FrameRefused as exc:
            self._break(f"The package sent {exc}.")
        if answer is None:
            self._break("The package closed its channel.")
        return answer

    def _break(self, reason: str):
        self.broken = reason
        self.on_broken(reason)
        raise ReplicaBroken(reason)
