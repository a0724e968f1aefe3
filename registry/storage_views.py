"""Download and upload endpoints behind the local storage backend's presigned URLs.

The signed token in the URL is the whole credential, as with an S3 presigned URL: no session,
no CSRF token, and only the key that was signed. Anything wrong with a token is a plain 404.
"""

from django.conf import settings
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from registry.storage import ObjectTooLarge, get_storage
from registry.storage.local import (
    DOWNLOAD_SALT,
    UPLOAD_SALT,
    LocalGrant,
    LocalStorage,
    verify_token,
)

DEFAULT_MAX_UPLOAD_BYTES = 5 * 1024**3


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


@csrf_exempt
@require_http_methods(["PUT"])
def local_upload(request: HttpRequest, token: str) -> HttpResponse:
    storage, grant = _granted(token, salt=UPLOAD_SALT)
    max_bytes = getattr(settings, "DATASET_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES)
    declared = request.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        return _too_large(max_bytes)
    try:
        # The request is read as a stream; the body is never held in memory whole.
        stored = storage.save(grant.key, request, max_bytes=max_bytes)
    except ObjectTooLarge:
        return _too_large(max_bytes)
    return JsonResponse({"size": stored.size, "sha256": stored.sha256})


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


urlpatterns = [
    path("storage/local/<str:token>/download", local_download, name="storage-local-download"),
    path("storage/local/<str:token>/upload", local_upload, name="storage-local-upload"),
]
