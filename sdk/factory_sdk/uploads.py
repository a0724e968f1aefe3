"""Dataset uploads that survive a dropped connection.

The API's large-file flow is three steps: start an upload (the server reserves a key, a place
among the organization's few open uploads and the file's size of its quota), send the file
straight to storage, finalize. The file goes in parts, PUT by a few threads at once, each part to
its own URL signed for its exact size; a server that predates parts gets it in one POST. The
started upload is remembered in the user's cache directory until it is finalized, so running the
same command again after the connection dropped continues that upload: it asks the server which
parts storage already holds and sends only the others.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from factory_sdk.client import Client, DatasetVersion, FactoryError, PendingUpload, UploadPart
from factory_sdk.config import cache_dir

CHUNK_BYTES = 1024 * 1024
# The fastest of 5 to 64 MiB parts and 2 to 8 in flight, measured against SeaweedFS on a 2-vCPU
# machine (docs/benchmarks.md); S3's smallest part is 5 MiB.
PART_BYTES = 8 * 1024 * 1024
PARALLEL_PARTS = 4
# The most part URLs the API signs per call.
URLS_PER_CALL = 1000


class UploadInterrupted(Exception):
    """The connection dropped while the file was being sent; the upload is remembered, and the
    same call (or command) run again continues it."""

    def __init__(self, upload_id: int, cause: Exception) -> None:
        super().__init__(f"The connection dropped during upload {upload_id}: {cause}")
        self.upload_id = upload_id


@dataclass(frozen=True)
class UploadResult:
    version: DatasetVersion
    upload_id: int
    sha256: str
    # True when this run continued an upload an earlier run had started.
    resumed: bool


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def upload_dataset(
    client: Client,
    path: Path,
    *,
    dataset: str,
    format: str = "",
    progress: Callable[[int], None] | None = None,
) -> UploadResult:
    """Upload `path` as the next version of `dataset` (created when missing), continuing the
    upload an earlier run of the same file started. `progress` is called with each chunk's size.

    A connection dropped while sending raises UploadInterrupted and leaves the upload
    remembered for the next run; an upload the server no longer has (finalized meanwhile, or
    expired) is forgotten.
    """
    size = path.stat().st_size
    sha256 = file_sha256(path)
    _ensure_dataset(client, dataset)
    state_path = _state_path(client, dataset=dataset, sha256=sha256, size=size)
    state = _load(state_path)
    resumed = state is not None
    if state is None:
        started = client.upload_start(
            dataset,
            filename=path.name,
            size_bytes=size,
            format=format,
            # An empty file has no parts.
            parts=size > 0,
            part_size_bytes=PART_BYTES,
        )
        state = {"upload": started, "sent": False}
        _save(state_path, state)
    upload: PendingUpload = state["upload"]
    if not state["sent"]:
        try:
            if upload.get("part_count"):
                send_parts(client, dataset, upload, path, progress)
            else:
                with path.open("rb") as file:
                    client.upload_send(upload, _Reporting(file, progress), filename=path.name)
        except httpx.TransportError as exc:
            raise UploadInterrupted(upload["id"], exc) from exc
        state["sent"] = True
        _save(state_path, state)
    try:
        version = client.upload_finalize(dataset, upload["id"])
    except FactoryError as exc:
        if exc.status == 404:
            state_path.unlink(missing_ok=True)
        elif exc.status == 400 and exc.code in ("invalid", "upload_incomplete"):
            # The store lacks bytes (an answer was lost): the next run sends what is missing.
            _save(state_path, {**state, "sent": False})
        raise
    state_path.unlink(missing_ok=True)
    return UploadResult(version=version, upload_id=upload["id"], sha256=sha256, resumed=resumed)


def send_parts(
    client: Client,
    dataset: str,
    upload: PendingUpload,
    path: Path,
    progress: Callable[[int], None] | None,
) -> None:
    """PUT the parts storage does not hold yet, PARALLEL_PARTS at a time; the first failure
    stops the rest, and a later run sends whatever is still missing."""
    missing = client.upload_parts(dataset, upload["id"])["missing"]
    part_size = upload["part_size_bytes"]
    if progress is not None:
        owed = sum(min(part_size, upload["size_bytes"] - (n - 1) * part_size) for n in missing)
        progress(upload["size_bytes"] - owed)  # what an earlier run already sent
    descriptor = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max_workers=PARALLEL_PARTS) as senders:
            for start in range(0, len(missing), URLS_PER_CALL):
                numbers = missing[start : start + URLS_PER_CALL]
                parts = client.upload_part_urls(dataset, upload["id"], numbers)
                sending = [
                    senders.submit(
                        client.upload_part_send,
                        part,
                        _part_bytes(descriptor, part, part_size=part_size, report=progress),
                    )
                    for part in parts
                ]
                try:
                    for sent in as_completed(sending):
                        sent.result()
                except BaseException:
                    for future in sending:
                        future.cancel()
                    raise
    finally:
        os.close(descriptor)


def _part_bytes(
    descriptor: int, part: UploadPart, *, part_size: int, report: Callable[[int], None] | None
) -> Iterator[bytes]:
    """The part's bytes read from the file a chunk at a time (pread: the threads share one
    descriptor without sharing a position), reporting each chunk as it goes."""
    offset = (part["number"] - 1) * part_size
    left = part["size_bytes"]
    while left > 0:
        chunk = os.pread(descriptor, min(CHUNK_BYTES, left), offset)
        if not chunk:
            raise OSError(f"the file ended before part {part['number']}; was it changed?")
        offset += len(chunk)
        left -= len(chunk)
        if report is not None:
            report(len(chunk))
        yield chunk


def _ensure_dataset(client: Client, name: str) -> None:
    try:
        client.dataset_get(name)
    except FactoryError as exc:
        if exc.status != 404:
            raise
        client.dataset_create(name)


def _state_path(client: Client, *, dataset: str, sha256: str, size: int) -> Path:
    """One state file per server, organization, dataset and file content: the same bytes sent
    to the same dataset resume; anything else starts afresh."""
    identity = "\n".join([client.url, client.org, dataset, sha256, str(size)])
    return cache_dir() / "uploads" / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.json"


def _load(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    expires_at = datetime.fromisoformat(state["upload"]["expires_at"].replace("Z", "+00:00"))
    if expires_at <= datetime.now(UTC):
        path.unlink(missing_ok=True)
        return None
    return state


def _save(path: Path, state: dict[str, Any]) -> None:
    """Written 0600: the state holds the upload's presigned URL, which grants a write."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(state, file)


class _Reporting:
    """The file as httpx streams it into the multipart body, reporting each chunk read; httpx
    takes the length from fileno() (so the body keeps a Content-Length the store checks)."""

    def __init__(self, file: BinaryIO, report: Callable[[int], None] | None) -> None:
        self._file = file
        self._report = report

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        if self._report is not None:
            self._report(len(chunk))
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()
