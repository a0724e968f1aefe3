"""S3 storage (AWS S3, MinIO, SeaweedFS, ...) through boto3, streaming in 8 MiB multipart parts."""

import base64
import contextlib
import hashlib
import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from django.utils.http import content_disposition_header

from .base import (
    ObjectNotFound,
    PresignedPost,
    Storage,
    StorageError,
    StoredObject,
    StoredPart,
    StreamDigest,
    UploadNotFound,
    read_up_to,
)

logger = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024
# Parts sent at once: the store's work on some (a round trip each, most of an upload's time)
# overlaps the reading and hashing of the next. Memory holds this many parts, plus one.
PARTS_IN_FLIGHT = 4
# DeleteObjects takes at most this many keys per call.
_DELETE_BATCH = 1000
# A missing bucket is a misconfiguration, not a missing object: GET reports it as NoSuchBucket,
# which stays an error (HEAD has no body to tell the two apart).
_MISSING_OBJECT = frozenset({"404", "NoSuchKey", "NotFound"})
_MISSING_BUCKET = frozenset({"404", "NoSuchBucket", "NotFound"})
_MISSING_UPLOAD = frozenset({"404", "NoSuchUpload"})


class S3Storage(Storage):
    def __init__(
        self,
        *,
        bucket: str,
        region: str,
        endpoint_url: str = "",
        access_key_id: str = "",
        secret_access_key: str = "",
    ) -> None:
        self.bucket = bucket
        self.region = region
        # Creating a client makes no request; the first call does.
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=region,
            # Empty keys fall back to boto3's own chain (environment, instance role).
            aws_access_key_id=access_key_id or None,
            aws_secret_access_key=secret_access_key or None,
            config=Config(
                signature_version="s3v4",
                # MinIO and SeaweedFS serve buckets as paths, not as host names.
                s3={"addressing_style": "path"},
                connect_timeout=5,
                read_timeout=60,
                retries={"mode": "standard", "total_max_attempts": 4},
                # The newer default checksum headers are refused by several S3-compatible
                # stores; each upload sends a Content-MD5 instead, which all of them check.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist yet."""
        with _s3_errors(self.bucket):
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if _error_code(exc) not in _MISSING_BUCKET:
                    raise
            params: dict[str, Any] = {"Bucket": self.bucket}
            # us-east-1 is the one region that refuses to be named as a location constraint.
            if self.region != "us-east-1":
                params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            try:
                self._client.create_bucket(**params)
            except ClientError as exc:
                if _error_code(exc) != "BucketAlreadyOwnedByYou":
                    raise

    def _save(
        self, key: str, stream: BinaryIO, *, content_type: str, max_bytes: int | None
    ) -> StoredObject:
        digest = StreamDigest(key=key, max_bytes=max_bytes)
        part = read_up_to(stream, PART_SIZE)
        digest.update(part)
        if len(part) < PART_SIZE:
            with _s3_errors(key):
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=part,
                    ContentType=content_type,
                    ContentMD5=_md5(part),
                )
            return digest.stored()

        with _s3_errors(key):
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=content_type
            )["UploadId"]
        try:
            parts = []
            in_flight: deque[Future] = deque()
            with ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT) as sender:
                while part:
                    number = len(parts) + len(in_flight) + 1
                    in_flight.append(sender.submit(self._upload_part, key, upload_id, number, part))
                    if len(in_flight) == PARTS_IN_FLIGHT:
                        parts.append(in_flight.popleft().result())
                    part = read_up_to(stream, PART_SIZE)
                    digest.update(part)
                parts.extend(future.result() for future in in_flight)
            with _s3_errors(key):
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            self._abort_upload(key, upload_id)
            raise
        return digest.stored()

    def _upload_part(self, key: str, upload_id: str, number: int, part: bytes) -> dict:
        with _s3_errors(key):
            response = self._client.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=part,
                ContentMD5=_md5(part),
            )
        return {"PartNumber": number, "ETag": response["ETag"]}

    @contextlib.contextmanager
    def _open(self, key: str) -> Iterator[BinaryIO]:
        with _s3_errors(key):
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            except ClientError as exc:
                if _error_code(exc) in _MISSING_OBJECT:
                    raise ObjectNotFound(key) from exc
                raise
        try:
            yield body
        finally:
            body.close()

    def _size(self, key: str) -> int | None:
        with _s3_errors(key):
            try:
                return self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
            except ClientError as exc:
                if _error_code(exc) in _MISSING_OBJECT:
                    return None
                raise

    def _delete(self, key: str) -> None:
        with _s3_errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def _list(self, prefix: str) -> Iterator[tuple[str, datetime]]:
        with _s3_errors(prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    yield item["Key"], item["LastModified"]

    def _delete_prefix(self, prefix: str) -> int:
        deleted = 0
        with _s3_errors(prefix):
            # Unfinished uploads hold storage too, and nothing else would ever remove them.
            uploads = self._client.get_paginator("list_multipart_uploads")
            for page in uploads.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    self._abort_upload(upload["Key"], upload["UploadId"])
            keys = []
            for page in self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                keys.extend(item["Key"] for item in page.get("Contents", []))
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = keys[start : start + _DELETE_BATCH]
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                )
                if response.get("Errors"):
                    first = response["Errors"][0]
                    raise StorageError(
                        f"could not delete {len(response['Errors'])} objects under {prefix}, "
                        f"first {first.get('Key')}: {first.get('Code')}"
                    )
                deleted += len(batch)
        return deleted

    def _presigned_get_url(self, key: str, *, filename: str, expires_s: int) -> str:
        return self._client.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "ResponseContentDisposition": content_disposition_header(True, filename),
            },
            ExpiresIn=expires_s,
        )

    def _presigned_post(self, key: str, *, size_bytes: int, expires_s: int) -> PresignedPost:
        # A presigned PUT cannot bound the body's size; a POST policy can, and the store refuses
        # (EntityTooLarge / EntityTooSmall) any other size before keeping a byte.
        post = self._client.generate_presigned_post(
            self.bucket,
            key,
            Conditions=[["content-length-range", size_bytes, size_bytes]],
            ExpiresIn=expires_s,
        )
        return PresignedPost(url=post["url"], fields=dict(post["fields"]))

    def _copy(self, source_key: str, target_key: str) -> None:
        # Server-side: the bytes never pass through this process; past PART_SIZE the managed
        # copy goes part by part, which also lifts CopyObject's 5 GB limit.
        with _s3_errors(source_key):
            try:
                self._client.copy(
                    {"Bucket": self.bucket, "Key": source_key},
                    self.bucket,
                    target_key,
                    Config=TransferConfig(
                        multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE
                    ),
                )
            except ClientError as exc:
                if _error_code(exc) in _MISSING_OBJECT:
                    raise ObjectNotFound(source_key) from exc
                raise

    def _multipart_start(self, key: str) -> str:
        with _s3_errors(key):
            return self._client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]

    def _multipart_part_url(
        self, key: str, *, upload_id: str, number: int, size_bytes: int, expires_s: int
    ) -> str:
        # ContentLength becomes a signed header (X-Amz-SignedHeaders=content-length;host): a
        # body of any other length no longer matches the signature, and the store refuses it
        # (SeaweedFS answers 403 SignatureDoesNotMatch) before keeping a byte.
        return self._client.generate_presigned_url(
            "upload_part",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "UploadId": upload_id,
                "PartNumber": number,
                "ContentLength": size_bytes,
            },
            ExpiresIn=expires_s,
        )

    def _multipart_parts(self, key: str, *, upload_id: str) -> list[StoredPart]:
        with _s3_errors(key):
            try:
                pages = self._client.get_paginator("list_parts").paginate(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
                return [
                    StoredPart(number=part["PartNumber"], size=part["Size"], etag=part["ETag"])
                    for page in pages
                    for part in page.get("Parts", [])
                ]
            except ClientError as exc:
                if _error_code(exc) in _MISSING_UPLOAD:
                    raise UploadNotFound(f"no multipart upload {upload_id} of {key}") from exc
                raise

    def _multipart_complete(self, key: str, *, upload_id: str, parts: list[StoredPart]) -> None:
        with _s3_errors(key):
            try:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={
                        "Parts": [{"PartNumber": p.number, "ETag": p.etag} for p in parts]
                    },
                )
            except ClientError as exc:
                if _error_code(exc) in _MISSING_UPLOAD:
                    raise UploadNotFound(f"no multipart upload {upload_id} of {key}") from exc
                raise

    def _multipart_abort(self, key: str, *, upload_id: str) -> None:
        with _s3_errors(key):
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except ClientError as exc:
                if _error_code(exc) not in _MISSING_UPLOAD:
                    raise

    def _multipart_uploads(self, prefix: str) -> Iterator[tuple[str, str, datetime]]:
        with _s3_errors(prefix):
            uploads = self._client.get_paginator("list_multipart_uploads")
            for page in uploads.paginate(Bucket=self.bucket, Prefix=prefix):
                for upload in page.get("Uploads", []):
                    yield upload["Key"], upload["UploadId"], upload["Initiated"]

    def _abort_upload(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (BotoCoreError, ClientError):
            # The caller is already failing with the error that matters; a lifecycle rule on
            # the bucket is the backstop for uploads left behind.
            logger.exception("could not abort multipart upload %s of %s", upload_id, key)


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _s3_errors(what: str) -> Iterator[None]:
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"S3 request for {what} failed: {exc}") from exc
