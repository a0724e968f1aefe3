"""Download and upload endpoints behind the local storage backend's presigned URLs.

The signed token in the URL is the whole credential, as with an S3 presigned URL: no session,
no CSRF token, and only the key that was signed. Anything wrong with a token is a plain 404; so
is an upload or part token whose pending upload was finalized, discarded or has expired.
"""

from django.core.files.uploadhandler import StopUpload, TemporaryFileUploadHandler
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from registry.selectors import pending_upload_accepts
from registry.storage import get_storage
from registry.storage.base import ObjectTooLarge, UploadNotFound
from registry.storage.keys import key_organization_id
from registry.storage.local import (
    DOWNLOAD_SALT,
    PART_SALT,
    UPLOAD_SALT,
    LocalGrant,
    LocalStorage,
    verify_token,
)

# The form's other entries and its boundaries, beside the file itself.
FORM_OVERHEAD_BYTES = 64 * 1024


@csrf_exempt
@require_http_methods(["GET", "HEAD"])
def local_download(request: HttpRequest, token: str) -> FileResponse:
    storage, grant = _granted(token, salt=DOWNLOAD_SALT)
    try:
        file = storage.path_for(grant.key).open("rb")
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise Http404 from exc
    # Served as opaque bytes whatever the name says, so a tenant's file never renders as a page.
    return FileResponse(
        file,
        as_attachment=True,
        filename=grant.filename,
        content_type="application/octet-stream",
    )


class _BoundedUpload(TemporaryFileUploadHandler):
    """Spools the form's file to disk, and stops reading the request once past `max_bytes`."""

    def __init__(self, request: HttpRequest, *, max_bytes: int) -> None:
        super().__init__(request)
        self.max_bytes = max_bytes
        self.received = 0
        self.too_large = False

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        self.received += len(raw_data)
        if self.received > self.max_bytes:
            self.too_large = True
            raise StopUpload(connection_reset=True)
        return super().receive_data_chunk(raw_data, start)


@csrf_exempt
@require_http_methods(["POST"])
def local_upload(request: HttpRequest, token: str) -> HttpResponse:
    """The local twin of an S3 presigned POST: a multipart form whose `file` must be exactly the
    signed size, accepted only while its pending upload is open."""
    storage, grant = _granted(token, salt=UPLOAD_SALT)
    size = grant.size_bytes
    if size is None or not pending_upload_accepts(
        organization_id=key_organization_id(grant.key), storage_key=grant.key
    ):
        raise Http404
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > size + FORM_OVERHEAD_BYTES:
        return _too_large(size)
    handler = _BoundedUpload(request, max_bytes=size)
    request.upload_handlers = [handler]
    try:
        uploaded = request.FILES.get("file")
    except MultiPartParserError:
        uploaded = None
    if handler.too_large:
        return _too_large(size)
    if uploaded is None:
        return _invalid("Send a multipart/form-data body with the bytes as its `file` entry.")
    if uploaded.size != size:
        return _invalid(f"The file is {uploaded.size} bytes; this upload was declared as {size}.")
    with uploaded:
        storage.save(grant.key, uploaded, max_bytes=size)
    return HttpResponse(status=204)


@csrf_exempt
@require_http_methods(["PUT"])
def local_part(request: HttpRequest, token: str) -> HttpResponse:
    """The local twin of an S3 presigned upload_part URL: a raw body of exactly the signed
    length, accepted only while its pending upload is open; answers the part's ETag."""
    storage, grant = _granted(token, salt=PART_SALT)
    size = grant.size_bytes
    if (
        size is None
        or grant.part_number is None
        or not pending_upload_accepts(
            organization_id=key_organization_id(grant.key), storage_key=grant.key
        )
    ):
        raise Http404
    declared = request.headers.get("Content-Length", "")
    # As S3 does with the signed length: any other declared length is refused before a byte.
    if declared != str(size):
        return _invalid(f"Send this part with a Content-Length of exactly {size} bytes.")
    try:
        part = storage.receive_part(
            grant.key,
            upload_id=grant.upload_id,
            number=grant.part_number,
            stream=request,
            size_bytes=size,
        )
    except UploadNotFound as exc:
        raise Http404 from exc
    except ObjectTooLarge:
        return _invalid(f"The body ended before {size} bytes.")
    response = HttpResponse(status=200)
    response["ETag"] = part.etag
    return response


def _granted(token: str, *, salt: str) -> tuple[LocalStorage, LocalGrant]:
    storage = get_storage()
    grant = verify_token(token, salt=salt)
    if grant is None or not isinstance(storage, LocalStorage):
        raise Http404
    return storage, grant


def _too_large(max_bytes: int) -> JsonResponse:
    return JsonResponse(
        {"code": "object_too_large", "detail": f"The upload is over {max_bytes} bytes."},
        status=413,
    )


def _invalid(detail: str) -> JsonResponse:
    return JsonResponse({"code": "invalid_upload", "detail": detail}, status=400)


urlpatterns = [
    path("storage/local/<str:token>/download", local_download, name="storage-local-download"),
    path("storage/local/<str:token>/upload", local_upload, name="storage-local-upload"),
    path("storage/local/<str:token>/part", local_part, name="storage-local-part"),
]
