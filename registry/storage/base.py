"""The storage interface every backend implements, its errors, and the streaming digest they share.

Public methods check their key here before a backend sees it, so no backend can forget to.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from .keys import check_key, check_prefix, download_filename

CHUNK_SIZE = 1024 * 1024
# SigV4 presigned URLs live at most a week.
MAX_URL_EXPIRY_S = 7 * 24 * 3600
# S3's bounds on a multipart upload: part numbers 1..10000, every part but the last at least
# 5 MiB, none over 5 GiB.
MAX_PARTS = 10_000
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_PART_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    sha256: str  # hex


@dataclass(frozen=True)
class PresignedPost:
    """Where a client POSTs one object as multipart/form-data: every entry of `fields` first,
    then the bytes as the form's `file` entry."""

    url: str
    fields: dict[str, str]


@dataclass(frozen=True)
class StoredPart:
    """One part a multipart upload holds, as the store reports it."""

    number: int
    size: int
    etag: str


class StorageError(Exception):
    """The backend failed: network, permissions, a full disk."""


class UploadNotFound(StorageError):
    """No multipart upload with that id under that key: completed, aborted, or never started."""


class ObjectTooLarge(StorageError):
    """The stream went past `max_bytes`; nothing of it was kept."""


class ObjectNotFound(StorageError):
    """No object under that key."""


class ObjectMismatch(Exception):
    """The object's bytes are not those recorded for it: the store changed them, or lost some.

    Not a StorageError: waiting does not make it right, so nothing retries it.
    """

    def __init__(self, key: str, *, field: str, recorded: str | int, found: str | int) -> None:
        super().__init__(f"{key} does not match its recorded {field}")
        self.key, self.field, self.recorded, self.found = key, field, recorded, found


class Storage(abc.ABC):
    """Objects addressed by server-generated keys under ``orgs/<id>/``."""

    def save(
        self,
        key: str,
        stream: BinaryIO,
        *,
        content_type: str = "application/octet-stream",
        max_bytes: int | None = None,
    ) -> StoredObject:
        """Stream `stream` to `key` in chunks, replacing any object there, and return its digest.

        Raises ObjectTooLarge, leaving nothing behind, once more than `max_bytes` arrive.
        """
        check_key(key)
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must not be negative, not {max_bytes}")
        return self._save(key, stream, content_type=content_type, max_bytes=max_bytes)

    def open(self, key: str) -> AbstractContextManager[BinaryIO]:
        """A streaming reader of the object; ObjectNotFound when there is none."""
        return self._open(check_key(key))

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when it does not exist."""
        return self._size(check_key(key))

    def delete(self, key: str) -> None:
        """Delete the object; a missing one is fine."""
        self._delete(check_key(key))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix`; returns how many there were."""
        return self._delete_prefix(check_prefix(prefix))

    def list(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        """Each object under `prefix` with when it was last written (UTC), in no set order."""
        return self._list(check_prefix(prefix))

    def presigned_get_url(self, key: str, *, filename: str, expires_s: int = 300) -> str:
        """A URL anyone holding it may download the object from, saved as `filename`."""
        return self._presigned_get_url(
            check_key(key), filename=download_filename(filename), expires_s=_expiry(expires_s)
        )

    def presigned_post(self, key: str, *, size_bytes: int, expires_s: int = 900) -> PresignedPost:
        """A form a client POSTs exactly `size_bytes` bytes to, stored under `key`; the server
        finalizes it later. The store itself refuses any other size."""
        if size_bytes < 0:
            raise ValueError(f"size_bytes must not be negative, not {size_bytes}")
        return self._presigned_post(
            check_key(key), size_bytes=size_bytes, expires_s=_expiry(expires_s)
        )

    def multipart_start(self, key: str) -> str:
        """Start a multipart upload to `key`; returns its id. Parts are sent by clients to URLs
        from `multipart_part_url`; nothing is under `key` until `multipart_complete`."""
        return self._multipart_start(check_key(key))

    def multipart_part_url(
        self, key: str, *, upload_id: str, number: int, size_bytes: int, expires_s: int
    ) -> str:
        """A URL a client PUTs part `number` to, exactly `size_bytes` long: the length is signed,
        so the store refuses any other."""
        if not 1 <= number <= MAX_PARTS:
            raise ValueError(f"part number must be between 1 and {MAX_PARTS}, not {number}")
        if size_bytes < 0:
            raise ValueError(f"size_bytes must not be negative, not {size_bytes}")
        return self._multipart_part_url(
            check_key(key),
            upload_id=upload_id,
            number=number,
            size_bytes=size_bytes,
            expires_s=_expiry(expires_s),
        )

    def multipart_parts(self, key: str, *, upload_id: str) -> list[StoredPart]:
        """The parts the upload holds, by number; UploadNotFound when it is no longer open."""
        return sorted(self._multipart_parts(check_key(key), upload_id=upload_id), key=_number)

    def multipart_complete(self, key: str, *, upload_id: str, parts: list[StoredPart]) -> None:
        """Join `parts` (as `multipart_parts` reported them) into the object under `key`; the
        upload takes no more parts afterwards."""
        self._multipart_complete(check_key(key), upload_id=upload_id, parts=parts)

    def multipart_abort(self, key: str, *, upload_id: str) -> None:
        """Drop the upload and the parts it holds; one already gone is fine."""
        self._multipart_abort(check_key(key), upload_id=upload_id)

    def multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str, datetime]]:
        """Each open multipart upload under `prefix`: key, upload id, when it was started."""
        return self._multipart_uploads(check_prefix(prefix))

    def copy(self, source_key: str, target_key: str) -> None:
        """Copy an object to another key inside the store, replacing any object there."""
        self._copy(check_key(source_key), check_key(target_key))

    def download_verified(self, key: str, path: Path, *, size: int, sha256: str) -> None:
        """Write the object to `path` if it is the `size` bytes with that sha256 recorded for it.

        Raises ObjectMismatch otherwise, leaving no file; it stops reading once past `size`, so a
        swapped-in huge object costs no more than the recorded one.
        """
        check_key(key)
        digest = hashlib.sha256()
        written = 0
        try:
            with self.open(key) as source, path.open("wb") as target:
                while chunk := source.read(CHUNK_SIZE):
                    written += len(chunk)
                    if written > size:
                        raise ObjectMismatch(
                            key, field="size", recorded=size, found=f"more than {size}"
                        )
                    digest.update(chunk)
                    target.write(chunk)
            if written != size:
                raise ObjectMismatch(key, field="size", recorded=size, found=written)
            if digest.hexdigest() != sha256:
                raise ObjectMismatch(key, field="sha256", recorded=sha256, found=digest.hexdigest())
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @abc.abstractmethod
    def _save(
        self, key: str, stream: BinaryIO, *, content_type: str, max_bytes: int | None
    ) -> StoredObject: ...

    @abc.abstractmethod
    def _open(self, key: str) -> AbstractContextManager[BinaryIO]: ...

    @abc.abstractmethod
    def _size(self, key: str) -> int | None: ...

    @abc.abstractmethod
    def _delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def _delete_prefix(self, prefix: str) -> int: ...

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterator[tuple[str, datetime]]: ...

    @abc.abstractmethod
    def _presigned_get_url(self, key: str, *, filename: str, expires_s: int) -> str: ...

    @abc.abstractmethod
    def _presigned_post(self, key: str, *, size_bytes: int, expires_s: int) -> PresignedPost: ...

    @abc.abstractmethod
    def _copy(self, source_key: str, target_key: str) -> None: ...

    @abc.abstractmethod
    def _multipart_start(self, key: str) -> str: ...

    @abc.abstractmethod
    def _multipart_part_url(
        self, key: str, *, upload_id: str, number: int, size_bytes: int, expires_s: int
    ) -> str: ...

    @abc.abstractmethod
    def _multipart_parts(self, key: str, *, upload_id: str) -> list[StoredPart]: ...

    @abc.abstractmethod
    def _multipart_complete(self, key: str, *, upload_id: str, parts: list[StoredPart]) -> None: ...

    @abc.abstractmethod
    def _multipart_abort(self, key: str, *, upload_id: str) -> None: ...

    @abc.abstractmethod
    def _multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str, datetime]]: ...


class StreamDigest:
    """Size and sha256 of the bytes written so far, refusing them once past `max_bytes`."""

    def __init__(self, *, key: str, max_bytes: int | None) -> None:
        self.key = key
        self.size = 0
        self._max_bytes = max_bytes
        self._sha256 = hashlib.sha256()

    def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise ObjectTooLarge(f"{self.key} is over the limit of {self._max_bytes} bytes")
        self._sha256.update(chunk)

    def stored(self) -> StoredObject:
        return StoredObject(key=self.key, size=self.size, sha256=self._sha256.hexdigest())


def read_up_to(stream: BinaryIO, size: int) -> bytes:
    """Read `size` bytes, fewer only at the end of the stream.

    Sockets and request bodies return short reads long before their end.
    """
    pieces = []
    remaining = size
    while remaining > 0:
        piece = stream.read(remaining)
        if not piece:
            break
        pieces.append(piece)
        remaining -= len(piece)
    return b"".join(pieces)


def _number(part: StoredPart) -> int:
    return part.number


def _expiry(expires_s: int) -> int:
    if not 1 <= expires_s <= MAX_URL_EXPIRY_S:
        raise ValueError(f"expires_s must be between 1 and {MAX_URL_EXPIRY_S}, not {expires_s}")
    return expires_s
