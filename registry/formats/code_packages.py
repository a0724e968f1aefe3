"""Code packages: a tenant's own training code as a zip or tar.gz with `factory.toml` at its root.

Every entry is checked the way dataset zips are (registry.formats.archives: no name outside the
archive, no links, no bombs), plus, for tars, no hard links, devices, FIFOs or sparse files, since
a tar can carry all of them. Every entry is read once through an expansion meter, so an archive
whose headers lie about its sizes is refused here and not when a worker unpacks it. Nothing in
the archive is executed or imported: the manifest is parsed as TOML and checked field by field.

The manifest (`factory.toml`; all tables but `parameters` refuse keys they do not know, so a
typo is an error, not a silent default):

    [package]
    name = "my-cnn"              # required; the package this uploads a version of
    version = "0.3.1"            # optional; the author's own label, stored as given
    [entry]
    train = "trainer.main:run"   # required: a dotted module path, a colon, a function name
    predict = "trainer.serve:predict"  # optional, same form
    [runtime]
    name = "torch-2.13-py311"    # required: the runtime (Python environment) it needs
    [outputs]
    model = true                 # what a run registers: a model version and/or a dataset
    dataset = false              # version; at least one is true
    [parameters]                 # optional: a JSON Schema (Draft 2020-12) written as a TOML
    type = "object"              # table, for the object of parameters a job passes
    [parameters.properties.epochs]
    type = "integer"
    minimum = 1
    default = 10

The parameters schema is a TOML table rather than a JSON string so that a package's one file
reads as one language. TOML has no null, so a schema needing `null` values cannot be written;
TOML dates and times are refused, as JSON Schema has no such values.
"""

from __future__ import annotations

import gzip
import io
import keyword
import math
import re
import tarfile
import tomllib
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from registry.formats.archives import (
    ExpansionMeter,
    check_declared_expansion,
    check_entry,
    check_entry_path,
    expansion_budget,
    open_checked_zip,
)
from registry.formats.base import DatasetFormatError, DatasetLimits
from tenants.errors import DomainError

MANIFEST_NAME = "factory.toml"
MAX_MANIFEST_BYTES = 64 * 1024
MAX_TAR_HEADER_BYTES = 64 * 1024
# JSON numbers a database and every JSON reader hold exactly.
MAX_INTEGER_BITS = 64
# Schema keywords that would let validation fetch, recurse through anchors or backtrack without
# end on a tenant's pattern: refused, so validating parameters against a package's schema stays
# local and bounded.
_REFUSED_KEYWORDS = {
    "$id",
    "$anchor",
    "$dynamicRef",
    "$dynamicAnchor",
    "$recursiveRef",
    "$recursiveAnchor",
    "pattern",
    "patternProperties",
}
_SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
# Deeper than any real parameters schema; keeps the schema checker's recursion bounded.
MAX_SCHEMA_DEPTH = 32
_PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_RUNTIME_NAME = re.compile(r"^[a-z0-9][a-z0-9.+_-]{0,63}$")
_MAX_VERSION_LABEL = 40
_TABLES = {"package", "entry", "runtime", "outputs", "parameters"}
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_CHUNK = 1024 * 1024


class CodePackageError(DomainError):
    """The upload is not a code package we accept; `fields` names the manifest field at fault."""

    code = "invalid_code_package"
    status = 400


@dataclass(frozen=True)
class CodePackageInspection:
    archive_format: str  # "zip" or "tar.gz"
    manifest: dict
    file_count: int


def inspect_code_package(path: Path, *, limits: DatasetLimits) -> CodePackageInspection:
    """Check the archive at `path` against `limits` and return its parsed manifest.

    Raises CodePackageError (a 400) for anything we would not run: a damaged or hostile archive,
    a missing manifest, or a manifest with a wrong field.
    """
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise CodePackageError(
            f"The package is {size:,} bytes, over our limit of {limits.max_bytes:,}; "
            "leave data and weights out of it (upload them as datasets and models)."
        )
    with path.open("rb") as file:
        head = file.read(4)
    try:
        if head.startswith(b"PK"):
            archive_format, files = "zip", _read_zip(path, limits)
        elif head.startswith(b"\x1f\x8b"):
            archive_format, files = "tar.gz", _read_tar_gz(path, limits)
        else:
            raise CodePackageError(
                "The file is neither a zip nor a tar.gz; archive the package folder with "
                "`zip -r` or `tar czf` and upload that."
            )
    except DatasetFormatError as exc:
        # The archive guards speak of datasets' errors; a code package answers with its own code.
        raise CodePackageError(exc.detail, fields=exc.fields) from exc
    manifest_bytes = files.manifest
    if manifest_bytes is None:
        raise CodePackageError(
            f"The archive has no {MANIFEST_NAME} at its root; put it beside your top-level "
            "modules (not inside a folder that wraps them).",
            fields={MANIFEST_NAME: ["missing at the archive root"]},
        )
    return CodePackageInspection(
        archive_format=archive_format,
        manifest=parse_manifest(manifest_bytes),
        file_count=files.count,
    )


@dataclass
class _Files:
    count: int = 0
    manifest: bytes | None = None


def _root_path(name: str) -> tuple[str, ...]:
    """The entry's path parts, with "./" and a trailing "/" gone (tar writes "./factory.toml")."""
    return PurePosixPath(name).parts


def _note_entry(files: _Files, seen: set[tuple[str, ...]], name: str, archive: str) -> bool:
    """Count an entry, refusing a second one at the same path; returns whether it is the manifest.

    Two entries at one path extract as whichever comes last, so what we checked would not be
    what runs.
    """
    # Compared as a case-insensitive, Unicode-normalizing file system would store them.
    parts = tuple(unicodedata.normalize("NFC", p).casefold() for p in _root_path(name))
    if parts in seen:
        raise CodePackageError(
            f"The {archive} holds {name!r} twice; re-create it so each path appears once."
        )
    seen.add(parts)
    files.count += 1
    return _root_path(name) == (MANIFEST_NAME,)


def _read_zip(path: Path, limits: DatasetLimits) -> _Files:
    files, seen = _Files(), set()
    with open_checked_zip(path, limits=limits) as archive:
        infos = archive.infolist()
        for info in infos:
            check_entry(info)
        archive_bytes = path.stat().st_size
        check_declared_expansion(infos, archive_bytes=archive_bytes, limits=limits)
        meter = ExpansionMeter(archive_bytes=archive_bytes, limits=limits)
        for info in infos:
            is_manifest = _note_entry(files, seen, info.filename, "zip")
            if info.is_dir():
                continue
            if is_manifest and info.file_size > MAX_MANIFEST_BYTES:
                raise _manifest_too_big()
            # Read to the end: the meter stops a lying entry, and zipfile checks each CRC.
            with meter.reading(archive, info) as entry:
                data = _read_all(entry, keep=is_manifest)
            if is_manifest:
                files.manifest = data
    return files


def _read_tar_gz(path: Path, limits: DatasetLimits) -> _Files:
    archive_bytes = path.stat().st_size
    budget = expansion_budget(archive_bytes, limits)
    try:
        with gzip.open(path, "rb") as raw:
            return _read_tar_stream(
                _CappedStream(raw, budget=budget, archive=archive_bytes), limits
            )
    except (tarfile.TarError, EOFError, OSError, zlib.error, RecursionError) as exc:
        raise CodePackageError(
            f"The tar.gz cannot be read ({exc}); re-create it with `tar czf` and upload it again."
        ) from exc


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose PAX or GNU long-name extension tarfile would read whole into memory:
    refused past MAX_TAR_HEADER_BYTES, so a few compressed megabytes cannot cost the web
    process a gigabyte."""

    def _proc_pax(self, tarfile):
        _check_header_size(self.size)
        return super()._proc_pax(tarfile)

    def _proc_gnulong(self, tarfile):
        _check_header_size(self.size)
        return super()._proc_gnulong(tarfile)


def _check_header_size(size: int) -> None:
    if size > MAX_TAR_HEADER_BYTES:
        raise CodePackageError(
            f"The tar has an extended header of {size:,} bytes; we accept at most "
            f"{MAX_TAR_HEADER_BYTES:,} (long names and attributes fit in far less)."
        )


def _read_tar_stream(stream: io.RawIOBase, limits: DatasetLimits) -> _Files:
    files, seen = _Files(), set()
    # "r|" reads strictly forward: no member is looked up twice, nothing is seeked back to.
    # ignore_zeros: a bad block does not end the reading (as it would by default) but is
    # skipped, so entries hidden behind one, which GNU tar would still unpack, are checked too.
    with tarfile.open(
        fileobj=stream, mode="r|", ignore_zeros=True, tarinfo=_BoundedTarInfo
    ) as archive:
        for member in archive:
            if files.count >= limits.max_archive_entries:
                raise CodePackageError(
                    f"The tar holds more than {limits.max_archive_entries:,} entries, the "
                    "most we accept; leave out what the code does not need."
                )
            check_tar_member(member)
            is_manifest = _note_entry(files, seen, member.name, "tar")
            if not member.isfile():
                continue
            if is_manifest and member.size > MAX_MANIFEST_BYTES:
                raise _manifest_too_big()
            entry = archive.extractfile(member)
            data = _read_all(entry, keep=is_manifest) if entry is not None else b""
            if is_manifest:
                files.manifest = data
    return files


def check_tar_member(member: tarfile.TarInfo) -> None:
    check_entry_path(member.name, archive="tar")
    if member.issym() or member.islnk():
        raise CodePackageError(
            f"The tar entry {member.name!r} is a link (to {member.linkname!r}); "
            "replace links with the files themselves."
        )
    if member.issparse() or not (member.isfile() or member.isdir()):
        raise CodePackageError(
            f"The tar entry {member.name!r} is not a regular file or folder (a device, a FIFO "
            "or a sparse file); a code package holds only files and folders."
        )


class _CappedStream(io.RawIOBase):
    """The decompressed tar, refused the moment it grows past the archive's expansion budget:
    a tar.gz bomb expands in the gzip layer, before any tar header could be checked."""

    def __init__(self, source, *, budget: int, archive: int) -> None:
        self._source, self._budget, self._archive = source, budget, archive
        self._total = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size if size is not None and size >= 0 else _CHUNK)
        self._total += len(data)
        if self._total > self._budget:
            raise CodePackageError(
                f"The tar.gz's {self._archive:,} bytes expand to more than {self._total:,}; "
                "real code does not compress that far, an archive bomb does."
            )
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _read_all(entry, *, keep: bool) -> bytes:
    kept = []
    for chunk in iter(lambda: entry.read(_CHUNK), b""):
        if keep:
            kept.append(chunk)
    return b"".join(kept)


def _manifest_too_big() -> CodePackageError:
    return CodePackageError(
        f"{MANIFEST_NAME} is over {MAX_MANIFEST_BYTES:,} bytes; a manifest names entry points "
        "and parameters, it holds no data.",
        fields={MANIFEST_NAME: [f"at most {MAX_MANIFEST_BYTES:,} bytes"]},
    )


# The manifest.


def _field_error(field: str, message: str) -> CodePackageError:
    return CodePackageError(f"{MANIFEST_NAME}: {field}: {message}", fields={field: [message]})


def parse_manifest(data: bytes) -> dict:
    """Parse and check `factory.toml`; returns it normalized (every optional part present)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise _manifest_too_big()
    try:
        text = data.decode("utf-8")
        raw = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise _field_error(MANIFEST_NAME, "is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise _field_error(MANIFEST_NAME, f"is not valid TOML ({exc})") from exc
    except ValueError as exc:  # an integer past Python's digit limit
        raise _field_error(MANIFEST_NAME, f"holds a value out of range ({exc})") from exc
    except RecursionError as exc:
        raise _field_error(MANIFEST_NAME, "nests too deeply") from exc
    unknown = sorted(set(raw) - _TABLES)
    if unknown:
        raise _field_error(unknown[0], f"unknown table; expected one of {sorted(_TABLES)}")
    package = _table(raw, "package", {"name", "version"})
    entry = _table(raw, "entry", {"train", "predict"})
    runtime = _table(raw, "runtime", {"name"})
    outputs = _table(raw, "outputs", {"model", "dataset"})
    manifest = {
        "package": {
            "name": _matching(package, "package", "name", _PACKAGE_NAME, _name_rule()),
            "version": _version_label(package),
        },
        "entry": {
            "train": _entry_point(entry, "train", required=True),
            "predict": _entry_point(entry, "predict", required=False),
        },
        "runtime": {
            "name": _matching(
                runtime,
                "runtime",
                "name",
                _RUNTIME_NAME,
                'must be a runtime name such as "torch-2.13-py311"',
            )
        },
        "outputs": _outputs(outputs),
        "parameters": _parameters_schema(raw.get("parameters")),
    }
    return manifest


def _name_rule() -> str:
    return (
        "must be 1-100 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit"
    )


def _table(raw: dict, name: str, keys: set[str]) -> dict:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise _field_error(name, f"must be a table ([{name}])")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise _field_error(f"{name}.{unknown[0]}", f"unknown key; expected one of {sorted(keys)}")
    return value


def _matching(table: dict, section: str, key: str, pattern: re.Pattern, rule: str) -> str:
    field = f"{section}.{key}"
    value = table.get(key)
    if value is None:
        raise _field_error(field, "is required")
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _field_error(field, rule)
    return value


def _version_label(package: dict) -> str | None:
    value = package.get("version")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_VERSION_LABEL:
        raise _field_error(
            "package.version",
            f"must be a non-empty string of at most {_MAX_VERSION_LABEL} characters",
        )
    return value


def _entry_point(entry: dict, key: str, *, required: bool) -> str | None:
    field = f"entry.{key}"
    value = entry.get(key)
    if value is None:
        if required:
            raise _field_error(field, 'is required, as "module:function"')
        return None
    if not isinstance(value, str) or not is_entry_point(value):
        raise _field_error(
            field,
            'must be "module:function": a dotted module path of Python identifiers '
            '(e.g. "trainer.main"), a colon, and a function name (e.g. "run")',
        )
    return value


def is_entry_point(value: str) -> bool:
    """Whether `value` is "pkg.module:function" in plain ASCII identifiers: it names a module
    inside the package by import path, never a file path, so it cannot point outside it."""
    module, colon, function = value.partition(":")
    if not colon or not module or not function:
        return False
    return all(_is_identifier(part) for part in [*module.split("."), function])


def _is_identifier(name: str) -> bool:
    return name.isascii() and name.isidentifier() and not keyword.iskeyword(name)


def _outputs(outputs: dict) -> dict:
    result = {}
    for key in ("model", "dataset"):
        value = outputs.get(key, False)
        if not isinstance(value, bool):
            raise _field_error(f"outputs.{key}", "must be true or false")
        result[key] = value
    if not any(result.values()):
        raise _field_error(
            "outputs", "must say what a run produces: model = true and/or dataset = true"
        )
    return result


def _parameters_schema(value: Any) -> dict:
    if value is None:
        return dict(_NO_PARAMETERS)
    if not isinstance(value, dict):
        raise _field_error("parameters", "must be a table holding a JSON Schema")
    _check_json_values(value, "parameters", depth=0)
    if value.get("type") != "object":
        raise _field_error(
            "parameters.type", 'must be "object": a job passes its parameters as one object'
        )
    try:
        Draft202012Validator.check_schema(value)
    except SchemaError as exc:
        where = ".".join(["parameters", *(str(p) for p in exc.path)])
        raise _field_error(
            where, f"is not a valid JSON Schema (Draft 2020-12): {exc.message}"
        ) from exc
    except RecursionError as exc:
        raise _field_error("parameters", "nests too deeply") from exc
    except (OverflowError, ValueError) as exc:
        raise _field_error("parameters", f"is not a valid JSON Schema ({exc})") from exc
    return value


def _check_json_values(value: Any, field: str, *, depth: int) -> None:
    """Refuse what JSON cannot hold (TOML dates and times), schemas nested past any real need,
    and `$ref`s that leave the schema (nothing may be fetched while checking it)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise _field_error(field, f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                raise _field_error(field, "has a key holding a NUL character")
            if key == "$ref" and not (isinstance(item, str) and item.startswith("#")):
                raise _field_error(
                    f"{field}.$ref", 'may only point inside the schema (start with "#")'
                )
            if key in _REFUSED_KEYWORDS:
                raise _field_error(
                    f"{field}.{key}",
                    "is not supported in a package's parameters schema (validation must stay "
                    "local and quick); use enum, format or a check in your code instead",
                )
            if key == "$schema" and item != _SCHEMA_URI:
                raise _field_error(f"{field}.$schema", f"may only be {_SCHEMA_URI!r}")
            _check_json_values(item, f"{field}.{key}", depth=depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_values(item, f"{field}.{index}", depth=depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise _field_error(field, "must be a finite number (JSON has no nan or inf)")
    elif isinstance(value, str) and "\x00" in value:
        raise _field_error(field, "holds a NUL character")
    elif isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise _field_error(field, f"is an integer wider than {MAX_INTEGER_BITS} bits")
    elif not isinstance(value, (str, int, float, bool)):
        raise _field_error(field, "must be a string, number, boolean, array or table (JSON values)")
