"""Local-directory storage for the embedded setup: files under a root, written atomically.

Its presigned URLs point at this Django site (`registry.storage_views`) and carry the key in a
token signed with SECRET_KEY, one salt per purpose, so a download token cannot upload.
"""

import contextlib
import os
import tempfile
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
    PresignedPost,
    Storage,
    StorageError,
    StoredObject,
    StreamDigest,
)
from .keys import check_key, download_filename

# Keys never have a segment starting with a dot, so these never collide with an object.
TEMP_PREFIX = ".partial-"

DOWNLOAD_SALT = "registry.storage.local.download"
UPLOAD_SALT = "registry.storage.local.upload"


@dataclass(frozen=True)
class LocalGrant:
    """What a verified local URL token allows: one key, the name to save a download as, and the
    exact size an upload must have."""

    key: str
    filename: str
    size_bytes: int | None = None


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
    return LocalGrant(key=key, filename=download_filename(payload.get("f", "")), size_bytes=size)


def _absolute(path: str) -> str:
    return settings.SITE_URL.rstrip("/") + path


@contextlib.contextmanager
def _filesystem_errors(key: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageError(f"storage failed for {key}: {exc}") from exc
