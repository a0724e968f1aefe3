"""A file sent in a request, as the API and the pages both receive it: refused early when its
declared length is over the limit, then handed to the services as a path on disk."""

import contextlib
import tempfile
from pathlib import Path

from django.conf import settings

from registry.formats import DatasetFormatError

# Multipart framing around the file itself.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024


@contextlib.contextmanager
def uploaded_path(uploaded):
    """The upload as a file on disk: Django's spooled temp file, or a copy of a small one."""
    if hasattr(uploaded, "temporary_file_path"):
        yield Path(uploaded.temporary_file_path())
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload"
        with path.open("wb") as target:
            for chunk in uploaded.chunks():
                target.write(chunk)
        yield path


def refuse_oversized_body(request, *, limit: int | None = None, error=DatasetFormatError) -> None:
    """Refuse before reading the body when its declared length is already over the limit."""
    limit = settings.DATASET_MAX_UPLOAD_BYTES if limit is None else limit
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit + MULTIPART_OVERHEAD_BYTES:
        raise error(
            f"The upload is {length} bytes; the limit is {limit}. "
            "Use a presigned upload for large files, or split the data into versions."
        )
