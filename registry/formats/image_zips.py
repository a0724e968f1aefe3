"""Validate a zip of images laid out as <class>/<file> and profile its classes and image sizes.

Every check on names, links, sizes and layout runs on the zip's directory before any entry is
opened; then only the first bytes of each image are read, to learn its format and size.
"""

from __future__ import annotations

import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from registry.formats.archives import (
    ExpansionMeter,
    check_declared_expansion,
    check_entry,
    open_checked_zip,
)
from registry.formats.base import (
    PREVIEW_ROWS,
    DatasetFormatError,
    DatasetInspection,
    DatasetLimits,
    too_many_rows,
)
from registry.formats.image_headers import MAX_IMAGE_PIXELS, ImageHeader, read_image_header

ACCEPTED_IMAGES = "PNG, JPEG, GIF, BMP or WebP"
SCHEMA = [
    {"name": "image", "dtype": "image", "nullable": False},
    {"name": "label", "dtype": "string", "nullable": False},
]


@dataclass(frozen=True)
class _Image:
    info: zipfile.ZipInfo
    path: str
    label: str


def inspect_image_zip(path: Path, limits: DatasetLimits) -> DatasetInspection:
    with open_checked_zip(path, limits=limits) as archive:
        entries = archive.infolist()
        for info in entries:
            check_entry(info)
        kept = [info for info in entries if not _is_ignored(info.filename)]
        files = [info for info in kept if not info.is_dir()]
        archive_bytes = path.stat().st_size
        _check_image_sizes(files, limits)
        check_declared_expansion(files, archive_bytes=archive_bytes, limits=limits)
        images = _class_layout(files, [info for info in kept if info.is_dir()])
        if len(images) > limits.max_rows:
            raise too_many_rows(limits.max_rows)
        meter = ExpansionMeter(archive_bytes=archive_bytes, limits=limits)
        headers = [_read_header(archive, image, meter) for image in images]
    return DatasetInspection(
        format="image_folder_zip",
        row_count=len(images),
        schema=[dict(column) for column in SCHEMA],
        profile={
            "classes": dict(sorted(Counter(image.label for image in images).items())),
            "image_sizes": _size_summary(headers),
        },
        preview=[{"path": image.path, "label": image.label} for image in images[:PREVIEW_ROWS]],
    )


def _is_ignored(name: str) -> bool:
    """Folders and files that macOS and editors add on their own: `__MACOSX/`, dotfiles."""
    parts = PurePosixPath(name).parts
    return parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


def _check_image_sizes(files: list[zipfile.ZipInfo], limits: DatasetLimits) -> None:
    for info in files:
        if info.file_size > limits.max_image_bytes:
            raise DatasetFormatError(
                f"The file {info.filename!r} is {info.file_size:,} bytes; each image may be at "
                f"most {limits.max_image_bytes:,}. Resize it or leave it out."
            )


def _class_layout(files: list[zipfile.ZipInfo], folders: list[zipfile.ZipInfo]) -> list[_Image]:
    """Map each file to its class, after stripping one folder that wraps everything."""
    if not files:
        raise DatasetFormatError(
            "The zip holds no images; put the images in one folder per class (<class>/<file>)."
        )
    paths = {info.filename: PurePosixPath(info.filename).parts for info in files}
    tops = {parts[0] for parts in paths.values()}
    wrapped = len(tops) == 1 and all(len(parts) == 3 for parts in paths.values())
    skip = 1 if wrapped else 0
    images = []
    for info in files:
        parts = paths[info.filename][skip:]
        if len(parts) != 2:
            raise _misplaced(info.filename, nested=len(parts) > 2)
        images.append(_Image(info, "/".join(parts), parts[0]))
    labels = {image.label for image in images}
    for folder in folders:
        parts = PurePosixPath(folder.filename).parts[skip:]
        if len(parts) == 1 and parts[0] not in labels:
            raise DatasetFormatError(
                f"The class folder {parts[0]!r} holds no images; add images or remove the folder."
            )
    if len(labels) < 2:
        raise DatasetFormatError(
            f"The zip has only one class folder ({next(iter(labels))!r}); a classifier needs at "
            "least two, each a folder of its images."
        )
    return images


def _misplaced(name: str, *, nested: bool) -> DatasetFormatError:
    where = "is nested more than one folder deep" if nested else "is not inside a class folder"
    return DatasetFormatError(
        f"The file {name!r} {where}; put every image directly in a folder named after its "
        "class (<class>/<file>), optionally inside one folder that wraps everything."
    )


def _read_header(archive: zipfile.ZipFile, image: _Image, meter: ExpansionMeter) -> ImageHeader:
    with meter.reading(archive, image.info) as entry:
        header = read_image_header(entry)
    if header is None:
        raise DatasetFormatError(
            f"The file {image.info.filename!r} is not a {ACCEPTED_IMAGES} image; "
            "remove it from the zip or convert it."
        )
    if header.width * header.height > MAX_IMAGE_PIXELS:
        raise DatasetFormatError(
            f"The image {image.info.filename!r} is {header.width} x {header.height} pixels, over "
            f"our limit of {MAX_IMAGE_PIXELS:,}; scale it down or leave it out."
        )
    return header


def _size_summary(headers: list[ImageHeader]) -> dict:
    widths = [header.width for header in headers]
    heights = [header.height for header in headers]
    return {
        "width": _spread(widths),
        "height": _spread(heights),
        "formats": dict(sorted(Counter(header.format for header in headers).items())),
    }


def _spread(values: list[int]) -> dict:
    return {"min": min(values), "max": max(values), "mean": sum(values) / len(values)}
