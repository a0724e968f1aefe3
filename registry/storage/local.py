"""Local-directory storage for the embedded setup: files under a root, written atomically.

Its presigned URLs point at this Django site (`registry.storage_views`) and carry the key in a
token signed with SECRET_KEY, one salt per purpose, so a download token cannot upload. Multipart
uploads keep their parts in a folder of their own beside the objects, joined on completion.
"""

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.core import signing
from django.urls import reverse

from .base import (
    CHUNK_SIZE,
    ObjectNotFound,
    ObjectTooLarge,
    PresignedPost,
    Storage,
    StorageError,
    StoredObject,
    StoredPart,
    StreamDigest,
    UploadNotFound,
)
from .keys import check_key, download_filename

# Keys never have a segment starting with a dot, so these never collide with an object.
TEMP_PREFIX = ".partial-"

DOWNLOAD_SALT = "registry.storage.local.download"
UPLOAD_SALT = "registry.storage.local.upload"
PART_SALT = "registry.storage.local.part"
# Open multipart uploads live beside the objects, in a folder no key can name (keys start with
# orgs/), one folder per upload holding its key and its parts.
MULTIPART_DIR = ".multipart"
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_KEY_FILE = "key"


@dataclass(frozen=True)
class LocalGrant:
    """What a verified local URL token allows: one key, the name to save a download as, and the
    exact size an upload must have."""

    key: str
    filename: str
    size_bytes: int | None = None
    # Set for a part of a multipart upload.
    upload_id: str = ""
    part_number: int | None = None


class LocalStorage(Storage):
    def __init__(self, *, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()

    def path_for(self, key: str) -> Path:
        """The file that holds `key` (it may not exist)."""
        return self._path(check_key(key))

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _save(
        self, key: str, stream: BinaryIO, *, content_type: str, max_bytes: int | None
    ) -> StoredObject:
        # A file keeps no content type; local downloads are always served as opaque bytes.
        path = self._path(key)
        digest = StreamDigest(key=key, max_bytes=max_bytes)
        with _filesystem_errors(key):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as temp:
                while chunk := stream.read(CHUNK_SIZE):
                    digest.update(chunk)
                    with _filesystem_errors(key):
                        temp.write(chunk)
                with _filesystem_errors(key):
                    temp.flush()
                    os.fsync(temp.fileno())
            with _filesystem_errors(key):
                os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            self._prune_empty_dirs(path.parent)
            raise
        return digest.stored()

    def _open(self, key: str) -> contextlib.AbstractContextManager[BinaryIO]:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(key) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key}: {exc}") from exc

    def _size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            return path.stat().st_size if path.is_file() else None
        except FileNotFoundError:
            return None

    def _delete(self, key: str) -> None:
        path = self._path(key)
        with _filesystem_errors(key):
            try:
                path.unlink()
            except FileNotFoundError:
                return
        self._prune_empty_dirs(path.parent)

    def _list(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        directory = self._path(prefix.rpartition("/")[0])
        with _filesystem_errors(prefix):
            for dirpath, _dirnames, filenames in os.walk(directory):
                for name in filenames:
                    path = Path(dirpath, name)
                    key = path.relative_to(self.root).as_posix()
                    if not name.startswith(TEMP_PREFIX) and key.startswith(prefix):
                        yield key, datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)

    def _delete_prefix(self, prefix: str) -> int:
        # The prefix may end inside a segment ("orgs/1/datasets/ab"), so walk its directory and
        # compare whole keys, as S3 does.
        directory = self._path(prefix.rpartition("/")[0])
        deleted = 0
        for key, upload_id, _started in list(self._multipart_uploads(prefix)):
            self._multipart_abort(key, upload_id=upload_id)
        with _filesystem_errors(prefix):
            for dirpath, _dirnames, filenames in os.walk(directory, topdown=False):
                for name in filenames:
                    path = Path(dirpath, name)
                    key = path.relative_to(self.root).as_posix()
                    if not name.startswith(TEMP_PREFIX) and key.startswith(prefix):
                        path.unlink(missing_ok=True)
                        deleted += 1
                self._prune_empty_dirs(Path(dirpath))
        return deleted

    def _presigned_get_url(self, key: str, *, filename: str, expires_s: int) -> str:
        token = signing.TimestampSigner(salt=DOWNLOAD_SALT).sign_object(
            {"k": key, "f": filename, "e": expires_s}
        )
        return _absolute(reverse("storage-local-download", kwargs={"token": token}))

    def _presigned_post(self, key: str, *, size_bytes: int, expires_s: int) -> PresignedPost:
        # The size travels signed in the token, as S3 keeps it in the signed policy.
        token = signing.TimestampSigner(salt=UPLOAD_SALT).sign_object(
            {"k": key, "e": expires_s, "n": size_bytes}
        )
        return PresignedPost(
            url=_absolute(reverse("storage-local-upload", kwargs={"token": token})), fields={}
        )

    def _multipart_start(self, key: str) -> str:
        upload_id = uuid.uuid4().hex
        directory = self.root / MULTIPART_DIR / upload_id
        with _filesystem_errors(key):
            directory.mkdir(parents=True)
            (directory / _KEY_FILE).write_text(key)
        return upload_id

    def _multipart_part_url(
        self, key: str, *, upload_id: str, number: int, size_bytes: int, expires_s: int
    ) -> str:
        # Key, upload, part and size travel signed in the token, as S3 signs them in the URL.
        token = signing.TimestampSigner(salt=PART_SALT).sign_object(
            {"k": key, "u": upload_id, "p": number, "e": expires_s, "n": size_bytes}
        )
        return _absolute(reverse("storage-local-part", kwargs={"token": token}))

    def receive_part(
        self, key: str, *, upload_id: str, number: int, stream: BinaryIO, size_bytes: int
    ) -> StoredPart:
        """Write part `number` of an open upload from `stream`, which must hold exactly
        `size_bytes`; a part sent again replaces the one before. UploadNotFound when the upload
        is no longer open; ObjectTooLarge (nothing kept) when the stream is not that size."""
        directory = self._upload_dir(key, upload_id)
        with _filesystem_errors(key):
            fd, temp_name = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
        try:
            written = 0
            with os.fdopen(fd, "wb") as temp:
                while written < size_bytes:
                    chunk = stream.read(min(CHUNK_SIZE, size_bytes - written))
                    if not chunk:
                        break
                    written += len(chunk)
                    temp.write(chunk)
                temp.flush()
                os.fsync(temp.fileno())
            if written != size_bytes:
                raise ObjectTooLarge(f"part {number} of {key} is {written} bytes, not {size_bytes}")
            path = directory / f"{number:05d}"
            with _filesystem_errors(key):
                os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        return _stored_part(path)

    def _multipart_parts(self, key: str, *, upload_id: str) -> list[StoredPart]:
        directory = self._upload_dir(key, upload_id)
        with _filesystem_errors(key):
            return [
                _stored_part(path)
                for path in directory.iterdir()
                if path.name.isdigit() and path.is_file()
            ]

    def _multipart_complete(self, key: str, *, upload_id: str, parts: list[StoredPart]) -> None:
        directory = self._upload_dir(key, upload_id)
        target = self._path(key)
        with _filesystem_errors(key):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as temp:
                for part in parts:
                    path = directory / f"{part.number:05d}"
                    # A part replaced since it was listed is not the one the caller checked.
                    if not path.is_file() or _stored_part(path) != part:
                        raise StorageError(f"part {part.number} of {key} changed or is gone")
                    with path.open("rb") as source:
                        shutil.copyfileobj(source, temp, CHUNK_SIZE)
                temp.flush()
                os.fsync(temp.fileno())
            with _filesystem_errors(key):
                os.replace(temp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        shutil.rmtree(directory, ignore_errors=True)

    def _multipart_abort(self, key: str, *, upload_id: str) -> None:
        try:
            directory = self._upload_dir(key, upload_id)
        except UploadNotFound:
            return
        with _filesystem_errors(key):
            shutil.rmtree(directory)

    def _multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str, datetime]]:
        with _filesystem_errors(prefix):
            try:
                directories = list((self.root / MULTIPART_DIR).iterdir())
            except FileNotFoundError:
                return
            for directory in directories:
                try:
                    key = (directory / _KEY_FILE).read_text()
                    started = datetime.fromtimestamp(directory.stat().st_mtime, tz=UTC)
                except FileNotFoundError:  # completed or aborted meanwhile
                    continue
                if key.startswith(prefix):
                    yield key, directory.name, started

    def _upload_dir(self, key: str, upload_id: str) -> Path:
        """The folder of the open upload `upload_id` to `key`; UploadNotFound otherwise."""
        if not isinstance(upload_id, str) or not _UPLOAD_ID.fullmatch(upload_id):
            raise UploadNotFound(f"no multipart upload {upload_id!r} of {key}")
        directory = self.root / MULTIPART_DIR / upload_id
        try:
            recorded = (directory / _KEY_FILE).read_text()
        except FileNotFoundError:
            recorded = None
        except OSError as exc:
            raise StorageError(f"cannot read upload {upload_id} of {key}: {exc}") from exc
        if recorded != key:
            raise UploadNotFound(f"no multipart upload {upload_id} of {key}")
        return directory

    def _copy(self, source_key: str, target_key: str) -> None:
        # A copy, not a rename or a hard link: the target shares nothing with the source's file.
        with self._open(source_key) as source:
            self._save(target_key, source, content_type="application/octet-stream", max_bytes=None)

    def _prune_empty_dirs(self, directory: Path) -> None:
        """Remove `directory` and its parents while empty, stopping at the organization's root."""
        stop = len(self.root.parts) + 2  # root/orgs/<id> stays
        while len(directory.parts) > stop:
            try:
                directory.rmdir()
            except OSError:  # not empty, or already gone
                return
            directory = directory.parent


def verify_token(token: str, *, salt: str) -> LocalGrant | None:
    """The grant a token made by LocalStorage carries, or None if forged, altered or expired."""
    signer = signing.TimestampSigner(salt=salt)
    try:
        # The expiry is inside the signed payload, so it is trusted only once the signature is.
        payload = signer.unsign_object(token)
        signer.unsign_object(token, max_age=int(payload["e"]))
        key = check_key(payload["k"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        return None
    size = payload.get("n")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        return None
    number = payload.get("p")
    if number is not None and (isinstance(number, bool) or not isinstance(number, int)):
        return None
    return LocalGrant(
        key=key,
        filename=download_filename(payload.get("f", "")),
        size_bytes=size,
        upload_id=str(payload.get("u", "")),
        part_number=number,
    )


def _stored_part(path: Path) -> StoredPart:
    """A part file as the store reports it; its tag changes whenever the file is replaced."""
    stat = path.stat()
    return StoredPart(
        number=int(path.name), size=stat.st_size, etag=f'"{stat.st_size}-{stat.st_mtime_ns}"'
    )


def _absolute(path: str) -> str:
    return settings.SITE_URL.rstrip("/") + path


@contextlib.contextmanager
def _filesystem_errors(key: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(f"storage failed for {key}: {exc}") from exc
