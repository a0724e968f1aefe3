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
import os
import re
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

import factory_job
from registry.formats.archives import check_entry, check_entry_path
from registry.formats.base import DatasetLimits
from registry.formats.code_packages import check_tar_member, inspect_code_package

from . import protocol
from .sandbox import MB, WORK_FOLDER, Limits, Runtime, SandboxSpec

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
) -> SandboxSpec:
    """The sandbox an attempt runs in: the runtime, the code and the in-job library read-only,
    the work folder writable, and an environment of the runtime's paths and nothing else."""
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
    return SandboxSpec(
        # -P: the work folder (the command's directory) is not put first on sys.path, so the
        # library and the code are what `import` finds.
        command=(runtime.interpreter, "-s", "-P", "-m", "factory_job"),
        work_folder=work_folder,
        read_only={
            **runtime.read_only,
            CODE_FOLDER: code_folder,
            f"{LIBRARY_FOLDER}/factory_job": library_folder() / "factory_job",
        },
        devices=devices,
        environment=environment,
        limits=limits,
    )
