"""Safety checks for zip uploads (.npz and image zips): before any entry is read, and as it is.

`zipfile.ZipFile` builds an object per entry as it opens, so the entry count is read from the
central directory first: a zip claiming millions of tiny entries is refused without parsing them.
Sizes are checked twice: from the directory before any work (a zip that admits to being a bomb
costs nothing to refuse), then by counting the bytes each entry really expands to as it is read
(`ExpansionMeter`), since the directory is written by the uploader and may lie.
"""

from __future__ import annotations

import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from registry.formats.base import DatasetFormatError, DatasetLimits

_END_RECORD = b"PK\x05\x06"
_END_RECORD_SIZE = 22
_MAX_COMMENT = 65_535
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_LOCATOR_SIZE = 20
_ZIP64_END_RECORD = b"PK\x06\x06"
_ZIP64_END_RECORD_SIZE = 56
_DIRECTORY_HEADER = b"PK\x01\x02"
_DIRECTORY_HEADER_SIZE = 46
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
# Stored and deflate are what numpy.savez and every common zip tool write. zipfile inflates a
# bzip2 or LZMA read whole before cutting it to the declared size, so a few hundred bytes of
# either can fill memory; they are refused before any byte is read.
_ACCEPTED_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
# Real data compresses at most a few dozen times over; far beyond that an entry is built to
# expand. Small entries are exempt: a few hundred bytes of padding compress past any ratio.
MAX_COMPRESSION_RATIO = 200
RATIO_CHECKED_FROM_BYTES = 1024 * 1024


def open_checked_zip(path: Path, *, limits: DatasetLimits) -> zipfile.ZipFile:
    """Open a zip after checking that it holds at most `limits.max_archive_entries` entries."""
    _check_entry_count(path, limits.max_archive_entries)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _unreadable_zip() from exc


def check_entry(info: zipfile.ZipInfo) -> None:
    """Refuse names that could escape a folder, links, and encrypted entries."""
    name = info.filename
    check_entry_path(name)
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DatasetFormatError(
            f"The zip entry {name!r} is a symbolic link; replace links with the files themselves."
        )
    if info.flag_bits & 0x1:
        raise DatasetFormatError(
            f"The zip entry {name!r} is password-protected; upload an unencrypted zip."
        )
    if info.compress_type not in _ACCEPTED_METHODS:
        raise DatasetFormatError(
            f"The zip entry {name!r} uses compression method {info.compress_type}; we accept "
            "stored or deflate entries only, which numpy.savez and every common zip tool write."
        )


def check_entry_path(name: str, *, archive: str = "zip") -> None:
    """Refuse an entry name (of a zip, or of a tar with `archive="tar"`) that could land outside
    the folder it is extracted into: empty, backslashed, absolute, or climbing with '..'."""
    if not name.strip("/"):
        raise DatasetFormatError(f"The {archive} has an entry without a name; re-create it.")
    if "\\" in name:
        raise DatasetFormatError(
            f"The {archive} entry {name!r} uses backslashes; "
            "create the archive with forward-slash paths (any standard tool does)."
        )
    if name.startswith("/") or _WINDOWS_DRIVE.match(name):
        raise DatasetFormatError(
            f"The {archive} entry {name!r} has an absolute path; "
            "archive the folder with relative paths."
        )
    if ".." in PurePosixPath(name).parts:
        raise DatasetFormatError(
            f"The {archive} entry {name!r} points outside the archive with '..'; "
            "archive the folder itself so every path stays inside it."
        )


def expansion_budget(archive_bytes: int, limits: DatasetLimits) -> int:
    """The most a whole archive of `archive_bytes` may expand to: the limit, and at most
    MAX_COMPRESSION_RATIO times its real size (which entries overlapping in the file, each
    within the ratio on its own, would otherwise multiply)."""
    by_ratio = max(MAX_COMPRESSION_RATIO * archive_bytes, RATIO_CHECKED_FROM_BYTES)
    return min(limits.max_uncompressed_bytes, by_ratio)


def check_declared_expansion(
    infos: list[zipfile.ZipInfo], *, archive_bytes: int, limits: DatasetLimits
) -> None:
    """Refuse, from the directory alone, entries and archives that say they are bombs."""
    total = 0
    for info in infos:
        _check_entry_ratio(info, info.file_size)
        total += info.file_size
    if total > limits.max_uncompressed_bytes:
        raise DatasetFormatError(
            f"The zip expands to {total:,} bytes, over our limit of "
            f"{limits.max_uncompressed_bytes:,}; split it into several uploads."
        )
    if total > expansion_budget(archive_bytes, limits):
        raise _archive_bomb(total, archive_bytes)


class ExpansionMeter:
    """Counts what an archive's entries really expand to as they are read, and stops the read
    the moment an entry passes its declared size or the ratio, or the archive its budget."""

    def __init__(self, *, archive_bytes: int, limits: DatasetLimits) -> None:
        self.archive_bytes = archive_bytes
        self.budget = expansion_budget(archive_bytes, limits)
        self.total = 0

    @contextmanager
    def reading(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[IO[bytes]]:
        with reading_entry(archive, info) as entry:
            yield _MeteredEntry(entry, info, self)

    def count(self, info: zipfile.ZipInfo, entry_total: int, added: int) -> None:
        self.total += added
        if entry_total > info.file_size:
            raise DatasetFormatError(
                f"The zip entry {info.filename!r} expands past the {info.file_size:,} bytes its "
                "header declares, so the zip is damaged or forged; re-create it."
            )
        _check_entry_ratio(info, entry_total)
        if self.total > self.budget:
            raise _archive_bomb(self.total, self.archive_bytes)


class _MeteredEntry:
    """A zip entry's stream that reports every byte it hands out to its meter."""

    def __init__(self, entry: IO[bytes], info: zipfile.ZipInfo, meter: ExpansionMeter) -> None:
        self._entry, self._info, self._meter = entry, info, meter
        self._read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._entry.read(size)
        self._read += len(data)
        self._meter.count(self._info, self._read, len(data))
        return data

    def tell(self) -> int:
        return self._read


def _check_entry_ratio(info: zipfile.ZipInfo, expanded: int) -> None:
    if expanded >= RATIO_CHECKED_FROM_BYTES and expanded > MAX_COMPRESSION_RATIO * max(
        info.compress_size, 1
    ):
        raise DatasetFormatError(
            f"The zip entry {info.filename!r} compresses more than {MAX_COMPRESSION_RATIO}:1, "
            "which real data does not; it looks like a zip bomb. Zip the real data instead."
        )


def _archive_bomb(expanded: int, archive_bytes: int) -> DatasetFormatError:
    return DatasetFormatError(
        f"The zip's {archive_bytes:,} bytes expand to more than {expanded:,}, which is more than "
        f"{MAX_COMPRESSION_RATIO}:1; real data does not compress that far, a zip bomb does. "
        "Zip the real data instead."
    )


@contextmanager
def reading_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[IO[bytes]]:
    """Open one entry, turning the many ways a damaged entry fails into one clear error."""
    try:
        with archive.open(info) as entry:
            yield entry
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as exc:
        raise DatasetFormatError(
            f"The zip entry {info.filename!r} cannot be read ({exc}); "
            "re-create the zip with standard deflate compression and upload it again."
        ) from exc


def _check_entry_count(path: Path, limit: int) -> None:
    with path.open("rb") as file:
        directory_start, directory_size = _locate_central_directory(file, path.stat().st_size)
        file.seek(directory_start)
        entries = 0
        consumed = 0
        while consumed < directory_size:
            header = file.read(_DIRECTORY_HEADER_SIZE)
            if len(header) < _DIRECTORY_HEADER_SIZE or not header.startswith(_DIRECTORY_HEADER):
                raise _unreadable_zip()
            name_length, extra_length, comment_length = struct.unpack("<3H", header[28:34])
            variable_length = name_length + extra_length + comment_length
            file.seek(variable_length, 1)
            consumed += _DIRECTORY_HEADER_SIZE + variable_length
            entries += 1
            if entries > limit:
                raise DatasetFormatError(
                    f"The zip holds more than {limit:,} entries, the most we accept; "
                    "split it into several uploads."
                )


def _locate_central_directory(file: BinaryIO, size: int) -> tuple[int, int]:
    """Return (offset, size) of the central directory, measured back from the end record.

    Measuring back from the end (as zipfile does) also handles data prepended to the archive.
    """
    tail_length = min(size, _END_RECORD_SIZE + _MAX_COMMENT)
    file.seek(size - tail_length)
    tail = file.read(tail_length)
    position = tail.rfind(_END_RECORD)
    if position < 0 or tail_length - position < _END_RECORD_SIZE:
        raise _unreadable_zip()
    end_offset = size - tail_length + position
    fields = struct.unpack("<4s4H2LH", tail[position : position + _END_RECORD_SIZE])
    entries, directory_size, directory_offset = fields[4], fields[5], fields[6]
    if entries != 0xFFFF and 0xFFFFFFFF not in (directory_size, directory_offset):
        return _checked_start(end_offset, directory_size), directory_size
    locator_offset = end_offset - _ZIP64_LOCATOR_SIZE
    record_offset = locator_offset - _ZIP64_END_RECORD_SIZE
    if record_offset < 0:
        raise _unreadable_zip()
    file.seek(locator_offset)
    if not file.read(4).startswith(_ZIP64_LOCATOR):
        return _checked_start(end_offset, directory_size), directory_size
    file.seek(record_offset)
    record = file.read(_ZIP64_END_RECORD_SIZE)
    if not record.startswith(_ZIP64_END_RECORD):
        raise _unreadable_zip()
    directory_size = struct.unpack("<Q", record[40:48])[0]
    return _checked_start(record_offset, directory_size), directory_size


def _checked_start(directory_end: int, directory_size: int) -> int:
    if directory_size > directory_end:
        raise _unreadable_zip()
    return directory_end - directory_size


def _unreadable_zip() -> DatasetFormatError:
    return DatasetFormatError(
        "The file starts like a zip archive but its directory is damaged; "
        "re-create the zip and upload it again."
    )
