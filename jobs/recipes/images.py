"""The image classifier recipe: a small ResNet trained from scratch on a zip of images (PNG,
JPEG, GIF, BMP or WebP, decoded with Pillow) in class folders or on an .npz of arrays, with
seeded flips and padded crops as augmentation, Adam and early stopping on the validation loss;
and batch inference that streams the images.

Every image is brought to `image_size` x `image_size` pixels (stretched, with antialiased
bilinear resampling) and to the model's channels: 1 when every training image is grayscale,
else 3 (alpha is dropped, gray is repeated, colour becomes luminance). uint8 pixels are scaled to
0-1 and floats are taken as they are; then each channel is standardised with the training
images' mean and standard deviation, which config.json keeps for inference.

As in the tabular recipe a run is a pure function of (data, parameters, seed): the split, each
epoch's shuffle and each step's augmentation come from generators derived from the seed, so a run
resumed from any checkpoint ends with the same weights as an uninterrupted one (bit for bit on the
CPU). Training holds the resized images in memory (size^2 x channels bytes each for uint8);
evaluation and inference read a chunk at a time. torch and NumPy are imported inside the
functions, because the web process imports this module to validate parameters.
"""

from __future__ import annotations

import abc
import base64
import csv
import functools
import json
import math
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from jobs.recipes.base import (
    CONFIG_FILENAME,
    PREDICTIONS_FILENAME,
    WEIGHTS_FILENAME,
    OnlinePredictor,
    Recipe,
    RecipeContext,
    RecipeInputError,
    RecipeResult,
    class_probabilities,
    online_input_object,
)
from jobs.recipes.training import Trainer, autocast, derived_seed

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

MAX_CLASSES = 1_000
# Images decoded, resized and scored at a time outside training: memory stays flat in the
# dataset's size, and a chunk is large enough to keep a GPU busy.
CHUNK_IMAGES = 256
# One residual block per stage; each stage after the first halves the resolution and doubles
# the channels, so 8 x 8 pixels (the smallest image_size) still leaves 2 x 2 at the end.
BLOCKS_PER_STAGE = [1, 1, 1]
# Streams of the seed: each use of randomness draws from its own generator.
_SPLIT, _SHUFFLE, _AUGMENT = 0, 1, 2
_NPZ_HINT = "save the images as x and the labels as y: numpy.savez(path, x=images, y=labels)"


class ImageClassifier(Recipe):
    name = "image-classifier"
    version = "1.0"
    kind = "train"
    dataset_formats = ("image_folder_zip", "npz")
    online = True
    # An image has no columns: the gate's one slicing is by true class (see validation_outcomes).
    gate_slice_by = "class"
    parameter_schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Image classifier",
        "description": (
            "Classifies images with a small residual network trained from scratch. The dataset "
            "is a zip of PNG, JPEG, GIF, BMP or WebP images with one folder per class "
            "(<class>/<image>), or an .npz "
            "with the images in an array named x, shaped (images, height, width) or (images, "
            "height, width, channels) as uint8 0-255 or floats 0-1, and their integer or text "
            "labels in an array named y, shaped (images,)."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "image_size": {
                "type": "integer",
                "minimum": 8,
                "maximum": 512,
                "default": 32,
                "title": "Image size",
                "description": "Every image is resized to this many pixels square.",
            },
            "epochs": {
                "type": "integer",
                "minimum": 1,
                "maximum": 1000,
                "default": 10,
                "title": "Epochs",
                "description": "The most passes over the training images.",
            },
            "batch_size": {
                "type": "integer",
                "minimum": 1,
                "maximum": 4096,
                "default": 64,
                "title": "Batch size",
                "description": "Images per optimizer step.",
            },
            "learning_rate": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 1,
                "default": 0.001,
                "title": "Learning rate",
                "description": "Adam's step size.",
            },
            "validation_fraction": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": 0.5,
                "default": 0.2,
                "title": "Validation fraction",
                "description": "Share of the images held out to measure the model and stop early.",
            },
            "early_stopping_patience": {
                "type": "integer",
                "minimum": 0,
                "maximum": 1000,
                "default": 3,
                "title": "Early stopping patience",
                "description": (
                    "Stop after this many epochs without a better validation loss and keep the "
                    "best epoch's weights; 0 trains every epoch."
                ),
            },
            "augment": {
                "type": "boolean",
                "default": True,
                "title": "Augment",
                "description": (
                    "Flip training images left to right at random and crop them at a random "
                    "offset from a padded copy, so the model learns shapes rather than positions."
                ),
            },
            "width": {
                "type": "integer",
                "minimum": 4,
                "maximum": 256,
                "default": 16,
                "title": "Width",
                "description": (
                    "Channels of the first convolution; each of the two later stages doubles it."
                ),
            },
        },
    }

    def train(self, ctx: RecipeContext) -> RecipeResult | None:
        import torch

        _refuse_several_processes(ctx)
        images = _open_images(ctx.dataset_path, ctx.dataset_format, labelled=True)
        classes = sorted(set(images.labels))
        if len(classes) < 2:
            raise RecipeInputError(
                f"Every image has the class {classes[0]!r}; a classifier needs at least two."
            )
        if len(classes) > MAX_CLASSES:
            raise RecipeInputError(
                f"The dataset has {len(classes):,} classes, more than the {MAX_CLASSES:,} this "
                "recipe predicts."
            )
        if images.count < 2:
            raise RecipeInputError("Training and validation need at least two images.")
        channels = 3 if images.has_color else 1
        size = ctx.parameters["image_size"]
        pixels = _load_all(images, channels, size)
        class_index = {label: index for index, label in enumerate(classes)}
        targets = torch.tensor([class_index[label] for label in images.labels], dtype=torch.int64)
        train_rows, val_rows = _split(images.count, ctx.parameters, ctx.seed)
        train = (pixels[train_rows], targets[train_rows])
        val = (pixels[val_rows], targets[val_rows])
        del pixels  # the split copied it; the largest allocation of the run need not stay twice
        model_input = _ModelInput(size, channels, classes, *_channel_statistics(train[0]))
        ctx.log(
            f"Training on {len(train_rows)} images, validating on {len(val_rows)}; "
            f"{len(classes)} classes; {channels} channel(s) at {size} x {size} pixels; "
            f"device {ctx.devices[0]}."
        )
        return _Trainer(ctx, model_input, train, val).run()

    def validation_outcomes(
        self, ctx: RecipeContext, *, model_dirs: dict[str, Path], split_seed: int, slice_column: str
    ) -> tuple[dict[str, list[bool]], list[str | None]]:
        """For the evaluation gate: whether each model in `model_dirs` (by role) classified each
        validation image right (a class a model does not know is a wrong answer), and, with the
        slice column "class", each image's true class as text. The images are those a training
        run of `ctx.parameters` seeded with `split_seed` held out, drawn as `train` draws them.

        Slices are by true class because an image has nothing else to slice by: the zip's only
        label is its class folder, the .npz's is y. A per-class slice is the share of that
        class's images a model recognises (its recall), so the gate stops a challenger that
        forgets one class while gaining overall."""
        import torch

        images = _open_images(ctx.dataset_path, ctx.dataset_format, labelled=True)
        _train_rows, val_rows = _split(images.count, ctx.parameters, split_seed)
        rows = val_rows.tolist()
        place = {row: index for index, row in enumerate(rows)}
        device = torch.device(ctx.devices[0])
        outcomes = {}
        for role, model_dir in model_dirs.items():
            model, model_input = _load_model_dir(model_dir, device)
            predicted: list[Any] = [None] * len(rows)
            # Every image is read, but only the held-out ones are scored; a chunk at a time keeps
            # memory flat in the dataset's size.
            for start, pixels in _chunks(images, model_input):
                held_out = [i for i in range(len(pixels)) if start + i in place]
                if not held_out:
                    continue
                logits = _logits(model, model_input.normalise(pixels[held_out], device))
                for i, label in zip(held_out, logits.argmax(dim=1).tolist(), strict=True):
                    predicted[place[start + i]] = model_input.classes[label]
            outcomes[role] = [
                predicted[index] == images.labels[row] for index, row in enumerate(rows)
            ]
        by_class = slice_column == self.gate_slice_by
        slices = [str(images.labels[row]) if by_class else None for row in rows]
        return outcomes, slices

    def evaluate(self, ctx: RecipeContext) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        model, model_input = _load_model(ctx)
        images = _open_images(ctx.dataset_path, ctx.dataset_format, labelled=True)
        class_index = {label: index for index, label in enumerate(model_input.classes)}
        device = torch.device(ctx.devices[0])
        loss_sum, correct, scored = 0.0, 0, 0
        for start, pixels in _chunks(images, model_input):
            labels = images.labels[start : start + len(pixels)]
            known = [i for i, label in enumerate(labels) if label in class_index]
            if not known:
                continue
            target = torch.tensor([class_index[labels[i]] for i in known], device=device)
            logits = _logits(model, model_input.normalise(pixels[known], device))
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == target).sum())
            scored += len(known)
        if not scored:
            raise RecipeInputError("No image of the dataset has a class the model knows.")
        return {
            "loss": loss_sum / scored,
            "accuracy": correct / scored,
            "rows": scored,
            "rows_with_unknown_class": images.count - scored,
        }

    def predict(self, ctx: RecipeContext) -> RecipeResult | None:
        """Write predictions.csv: the image's `path` in the zip (or its `index` in x), the
        predicted class and its probability, one row per image in the dataset's order."""
        import torch

        _refuse_several_processes(ctx)
        model, model_input = _load_model(ctx)
        images = _open_images(ctx.dataset_path, ctx.dataset_format, labelled=False)
        device = torch.device(ctx.devices[0])
        ctx.output_dir.mkdir(parents=True, exist_ok=True)
        path = ctx.output_dir.resolve() / PREDICTIONS_FILENAME
        ctx.log(f"Predicting {images.count} images on {ctx.devices[0]}.")
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([images.id_column, "prediction", "probability"])
            for start, pixels in _chunks(images, model_input):
                if ctx.should_stop():
                    return None
                logits = _logits(model, model_input.normalise(pixels, device))
                probabilities, predicted = logits.double().softmax(dim=1).max(dim=1)
                writer.writerows(
                    (images.ids[start + offset], model_input.classes[index], f"{probability:.6f}")
                    for offset, (index, probability) in enumerate(
                        zip(predicted.tolist(), probabilities.tolist(), strict=True)
                    )
                )
                ctx.progress(start + len(pixels), images.count, 1)
        return RecipeResult(
            metrics={"rows": images.count},
            artifacts={PREDICTIONS_FILENAME: path.relative_to(ctx.workdir.resolve()).as_posix()},
            input_signature=model_input.input_signature(),
        )

    @classmethod
    def online_predictor(cls, model_dir: Path, device: str = "cpu") -> OnlinePredictor:
        """Inputs are `{"image": base64 of an image file's bytes}` (any format and size the
        datasets take; decoded by jobs.recipes.image_decode, which refuses images over its
        pixel limit from the header); outputs `{"label": class, "probabilities": {class: p}}`."""
        import torch

        model, model_input = _load_model_dir(model_dir, torch.device(device))

        def predict(inputs: list[Any]) -> list[dict[str, Any]]:
            if not inputs:
                return []
            pixels = torch.cat(
                [
                    _to_model_pixels(
                        _online_image(item, position)[None],
                        model_input.channels,
                        model_input.size,
                    )
                    for position, item in enumerate(inputs)
                ]
            )
            logits = _logits(model, model_input.normalise(pixels, torch.device(device)))
            probabilities = logits.double().softmax(dim=1).tolist()
            return class_probabilities(model_input.classes, probabilities)

        return predict


def _online_image(item: Any, position: int) -> np.ndarray:
    """The decoded pixels of one online input; RecipeInputError naming it when they cannot be."""
    from jobs.recipes.image_decode import ImageDecodeError, decode_image

    encoded = online_input_object(item, position, "image", str, "the image file in base64")
    try:
        data = base64.b64decode(encoded, validate=True)
    except ValueError as exc:  # binascii.Error, or characters that are not ASCII
        raise RecipeInputError(f"inputs[{position}].image is not valid base64.") from exc
    try:
        return decode_image(data)
    except ImageDecodeError as exc:
        raise RecipeInputError(f"inputs[{position}].image: {exc}") from exc


def _refuse_several_processes(ctx: RecipeContext) -> None:
    if getattr(ctx, "world_size", 1) > 1:
        raise RecipeInputError(
            f"Recipe {ImageClassifier.name!r} runs on one GPU; submit the job with one GPU."
        )


# Reading the images


class _Images(abc.ABC):
    """A dataset's images, read a chunk at a time in a fixed order, with their labels when the
    layout carries them."""

    id_column: str
    count: int
    ids: Sequence[Any]
    labels: list[Any]
    has_color: bool
    floating: bool  # pixels are floats (0-1), not uint8

    @abc.abstractmethod
    def chunks(self, chunk_images: int) -> Iterator[np.ndarray]:
        """(images, height, width, channels) arrays of at most `chunk_images` images in the
        file's pixel type; the channels are as stored (alpha included)."""


def _open_images(path: Path, dataset_format: str, *, labelled: bool) -> _Images:
    if dataset_format == "image_folder_zip":
        return _ZipImages(path, labelled=labelled)
    if dataset_format == "npz":
        return _NpzImages(path, labelled=labelled)
    raise RecipeInputError(
        f"Recipe {ImageClassifier.name!r} reads image_folder_zip and npz datasets, "
        f"not {dataset_format}."
    )


class _ZipImages(_Images):
    """Images in a zip, sorted by path. Labelled, the layout is the registry's: a folder per
    class, optionally inside one folder that wraps everything; unlabelled, any layout."""

    id_column = "path"
    floating = False

    def __init__(self, path: Path, *, labelled: bool) -> None:
        from jobs.recipes.image_decode import ImageDecodeError, image_is_color

        self.path = path
        try:
            with zipfile.ZipFile(path) as archive:
                self.entries = sorted(
                    (
                        info
                        for info in archive.infolist()
                        if not info.is_dir() and not _is_ignored(info.filename)
                    ),
                    key=lambda info: info.filename,
                )
                if not self.entries:
                    raise RecipeInputError("The zip holds no images.")
                # Every header first, so that a file that is no image fails the job in seconds
                # rather than after decoding all the images before it.
                colors = []
                for info in self.entries:
                    try:
                        with self._opened(archive, info) as entry:
                            colors.append(image_is_color(entry))
                    except ImageDecodeError as exc:
                        raise _bad_image(info.filename, exc) from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise RecipeInputError(f"The dataset is not a readable zip ({exc}).") from exc
        self.ids = [info.filename for info in self.entries]
        self.count = len(self.entries)
        self.has_color = any(colors)
        self.labels = _class_folders(self.ids) if labelled else []

    def chunks(self, chunk_images: int) -> Iterator[np.ndarray]:
        import numpy as np

        from jobs.recipes.image_decode import ImageDecodeError, decode_image

        with zipfile.ZipFile(self.path) as archive:
            for info in self.entries:
                try:
                    with self._opened(archive, info) as entry:
                        data = entry.read()
                    image = decode_image(data)
                except ImageDecodeError as exc:
                    raise _bad_image(info.filename, exc) from None
                # Images differ in size, so each is a chunk of its own.
                yield np.expand_dims(image, 0)

    @staticmethod
    @contextmanager
    def _opened(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[IO[bytes]]:
        try:
            with archive.open(info) as entry:
                yield entry
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            raise RecipeInputError(
                f"The zip entry {info.filename!r} cannot be read ({exc}); re-create the zip."
            ) from exc


def _is_ignored(name: str) -> bool:
    """Folders and files that macOS and editors add on their own, as the registry ignores them."""
    parts = PurePosixPath(name).parts
    return parts[0] == "__MACOSX" or any(part.startswith(".") for part in parts)


def _class_folders(names: list[str]) -> list[str]:
    parts = [PurePosixPath(name).parts for name in names]
    wrapped = len({p[0] for p in parts}) == 1 and all(len(p) == 3 for p in parts)
    labels = []
    for name, path_parts in zip(names, parts, strict=True):
        inside = path_parts[1:] if wrapped else path_parts
        if len(inside) != 2:
            raise RecipeInputError(
                f"The file {name!r} is not directly inside a class folder; put every image in a "
                "folder named after its class (<class>/<image>)."
            )
        labels.append(inside[0])
    return labels


def _bad_image(name: str, exc: Exception) -> RecipeInputError:
    return RecipeInputError(f"The image {name!r} cannot be used: {exc}")


class _NpzImages(_Images):
    """x (and y) of an .npz. x is read from its .npy entry in chunks of rows, so that scoring
    a large archive needs memory for one chunk only; nothing is unpickled."""

    id_column = "index"

    def __init__(self, path: Path, *, labelled: bool) -> None:
        import numpy as np

        self.path = path
        try:
            with zipfile.ZipFile(path) as archive, self._open_x(archive) as entry:
                self.shape, self.fortran_order, self.dtype = _read_npy_header(entry)
                self.data_offset = entry.tell()
        except (zipfile.BadZipFile, OSError) as exc:
            raise RecipeInputError(f"The dataset is not a readable .npz archive ({exc}).") from exc
        if self.dtype != np.uint8 and self.dtype.kind != "f":
            raise RecipeInputError(
                f"x holds {self.dtype}; save uint8 pixels (0-255) or floats (0-1), for example "
                "x.astype(numpy.uint8)."
            )
        channels = self.shape[3] if len(self.shape) == 4 else 1
        if len(self.shape) not in (3, 4) or not 1 <= channels <= 4 or 0 in self.shape:
            raise RecipeInputError(
                f"x has the shape {list(self.shape)}; it must be (images, height, width) or "
                "(images, height, width, channels) with 1 to 4 channels and no empty side."
            )
        self.count = self.shape[0]
        self.ids = range(self.count)
        self.has_color = channels >= 3
        self.floating = self.dtype.kind == "f"
        self.labels = self._labels() if labelled else []

    def _open_x(self, archive: zipfile.ZipFile) -> Any:
        try:
            return archive.open("x.npy")
        except KeyError:
            raise RecipeInputError(f"The .npz has no array named x; {_NPZ_HINT}.") from None

    def _labels(self) -> list[Any]:
        import numpy as np

        try:
            with np.load(self.path, allow_pickle=False) as archive:
                if "y" not in archive.files:
                    raise RecipeInputError(f"The .npz has no array named y; {_NPZ_HINT}.")
                y = archive["y"]
        except ValueError as exc:  # object arrays, which would need unpickling
            raise RecipeInputError(f"y cannot be read without unpickling ({exc}).") from exc
        if y.shape != (self.count,) or y.dtype.kind not in "iuU":
            raise RecipeInputError(
                f"y is {y.dtype} shaped {list(y.shape)}; it must hold one integer or text label "
                f"per image, shaped ({self.count},)."
            )
        return y.tolist()

    def chunks(self, chunk_images: int) -> Iterator[np.ndarray]:
        import numpy as np

        if self.fortran_order:
            # Column-major rows are spread over the whole entry; such an array is read at once.
            with np.load(self.path, allow_pickle=False) as archive:
                x = archive["x"]
            for start in range(0, self.count, chunk_images):
                yield self._checked(x[start : start + chunk_images], start)
            return
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as archive, archive.open("x.npy") as entry:
            entry.read(self.data_offset)
            for start in range(0, self.count, chunk_images):
                rows = min(chunk_images, self.count - start)
                data = entry.read(rows * row_bytes)
                if len(data) != rows * row_bytes:
                    raise RecipeInputError("x ends early, so the .npz is damaged; save it again.")
                chunk = np.frombuffer(data, dtype=self.dtype).reshape(rows, *self.shape[1:])
                yield self._checked(chunk, start)

    def _checked(self, chunk: np.ndarray, start: int) -> np.ndarray:
        import numpy as np

        if self.floating:
            bad = np.flatnonzero(~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1))
            if len(bad):
                raise RecipeInputError(
                    f"x[{start + int(bad[0])}] holds NaN or infinite values; replace them."
                )
        return chunk if chunk.ndim == 4 else chunk[..., None]


def _read_npy_header(entry: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    from numpy.lib import format as npy_format

    try:
        version = npy_format.read_magic(entry)
        if version == (1, 0):
            return npy_format.read_array_header_1_0(entry)
        if version == (2, 0):
            return npy_format.read_array_header_2_0(entry)
        raise ValueError(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise RecipeInputError(f"x has a damaged header ({exc}); {_NPZ_HINT}.") from exc


def _to_model_pixels(images: np.ndarray, channels: int, size: int) -> torch.Tensor:
    """(n, channels, size, size) in the images' pixel type (uint8 or float32)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    floating = images.dtype.kind == "f"
    if images.shape[3] in (2, 4):  # alpha
        images = images[..., :-1]
    if images.shape[3] == 1 and channels == 3:
        images = np.repeat(images, 3, axis=3)
    elif images.shape[3] == 3 and channels == 1:
        # ITU-R BT.601 luma, what most tools call "convert to grayscale".
        luma = images @ np.array([0.299, 0.587, 0.114])
        images = (luma if floating else luma.round())[..., None]
    tensor = torch.tensor(images, dtype=torch.float32 if floating else torch.uint8)
    tensor = tensor.permute(0, 3, 1, 2)
    if tensor.shape[2:] == (size, size):
        return tensor.contiguous()
    resized = F.interpolate(
        tensor.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized if floating else resized.round().clamp(0, 255).to(torch.uint8)


def _chunks(images: _Images, model_input: _ModelInput) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the chunk's first image, its pixels for the model) for CHUNK_IMAGES images at
    a time."""
    import torch

    start, pending = 0, []
    for chunk in images.chunks(CHUNK_IMAGES):
        pending.append(_to_model_pixels(chunk, model_input.channels, model_input.size))
        if sum(len(part) for part in pending) >= CHUNK_IMAGES:
            pixels = torch.cat(pending)
            yield start, pixels
            start, pending = start + len(pixels), []
    if pending:
        yield start, torch.cat(pending)


def _load_all(images: _Images, channels: int, size: int) -> torch.Tensor:
    import torch

    pixels = torch.empty(
        (images.count, channels, size, size),
        dtype=torch.float32 if images.floating else torch.uint8,
    )
    position = 0
    for chunk in images.chunks(CHUNK_IMAGES):
        converted = _to_model_pixels(chunk, channels, size)
        pixels[position : position + len(converted)] = converted
        position += len(converted)
    return pixels


# The model and its input


class _ModelInput:
    """How pixels become the model's input: size, channels, scale and standardisation; saved in
    config.json so that evaluation and inference prepare images the same way."""

    def __init__(
        self,
        size: int,
        channels: int,
        classes: list[Any],
        mean: list[float],
        std: list[float],
    ) -> None:
        self.size, self.channels, self.classes = size, channels, classes
        self.mean, self.std = mean, std

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _ModelInput:
        normalisation = config["normalisation"]
        return cls(
            config["image_size"],
            config["channels"],
            config["classes"],
            normalisation["mean"],
            normalisation["std"],
        )

    def architecture(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return {
            "type": "resnet",
            "channels": self.channels,
            "width": parameters["width"],
            "blocks_per_stage": BLOCKS_PER_STAGE,
            "classes": len(self.classes),
        }

    def config(self, architecture: dict[str, Any]) -> dict[str, Any]:
        return {
            "recipe": ImageClassifier.name,
            "recipe_version": ImageClassifier.version,
            "architecture": architecture,
            "image_size": self.size,
            "channels": self.channels,
            "classes": self.classes,
            "normalisation": {
                "pixel_scale": "uint8 pixels divided by 255, floats as they are",
                "mean": self.mean,
                "std": self.std,
            },
        }

    def input_signature(self) -> dict[str, Any]:
        return {
            "image_size": self.size,
            "channels": self.channels,
            "classes": self.classes,
        }

    def normalise(self, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Float32 model input on `device` from uint8 or float pixels on the CPU."""
        import torch

        values = pixels.to(device, non_blocking=True).float()
        if pixels.dtype == torch.uint8:
            values = values / 255
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (values - mean) / std


def _channel_statistics(pixels: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean and standard deviation per channel on the 0-1 scale, summed in float64 a chunk at a
    time so that no float copy of the whole training set is made."""
    import torch

    total = torch.zeros(pixels.shape[1], dtype=torch.float64)
    squares = torch.zeros(pixels.shape[1], dtype=torch.float64)
    for start in range(0, len(pixels), CHUNK_IMAGES):
        values = pixels[start : start + CHUNK_IMAGES].double()
        if pixels.dtype == torch.uint8:
            values /= 255
        total += values.sum(dim=(0, 2, 3))
        squares += values.square().sum(dim=(0, 2, 3))
    count = len(pixels) * pixels.shape[2] * pixels.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0).sqrt()
    # A constant channel carries nothing; dividing by 1 keeps it at 0 rather than inflating noise.
    return mean.tolist(), [value if value > 1e-6 else 1.0 for value in std.tolist()]


@functools.cache
def _residual_block() -> type[nn.Module]:
    """The block class, defined on first use so that importing this module does not load torch."""
    from torch import nn

    class ResidualBlock(nn.Module):
        """Two 3x3 convolutions with batch norm, added to the input (projected by a strided 1x1
        convolution when the resolution or the channels change)."""

        def __init__(self, inputs: int, outputs: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(outputs)
            self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(outputs)
            # Each block starts as the identity, which trains faster and more stably (Goyal et
            # al., "Accurate, Large Minibatch SGD", 2017).
            nn.init.zeros_(self.bn2.weight)
            self.shortcut = nn.Identity()
            if stride != 1 or inputs != outputs:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(outputs),
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn1(self.conv1(x)).relu()
            return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()

    return ResidualBlock


def _build_model(architecture: dict[str, Any]) -> nn.Sequential:
    from torch import nn

    if architecture.get("type") != "resnet":
        raise RecipeInputError(f"The model's architecture {architecture.get('type')!r} is unknown.")
    block = _residual_block()
    width = architecture["width"]
    layers: list[nn.Module] = [
        nn.Conv2d(architecture["channels"], width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    channels = width
    for stage, blocks in enumerate(architecture["blocks_per_stage"]):
        outputs = width * 2**stage
        for index in range(blocks):
            layers.append(block(channels, outputs, 2 if stage and not index else 1))
            channels = outputs
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, architecture["classes"])]
    return nn.Sequential(*layers)


def _load_model(ctx: RecipeContext) -> tuple[nn.Sequential, _ModelInput]:
    import torch

    if ctx.model_dir is None:
        raise ValueError("evaluate and predict need ctx.model_dir, the trained model's artifacts.")
    return _load_model_dir(ctx.model_dir, torch.device(ctx.devices[0]))


def _load_model_dir(model_dir: Path, device: torch.device) -> tuple[nn.Sequential, _ModelInput]:
    from safetensors.torch import load_file

    config = json.loads((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    if config.get("recipe") != ImageClassifier.name:
        raise RecipeInputError(
            f"The model was trained by recipe {config.get('recipe')!r}, not "
            f"{ImageClassifier.name!r}; choose that recipe to use it."
        )
    model = _build_model(config["architecture"])
    model.load_state_dict(load_file(model_dir / WEIGHTS_FILENAME))
    model.to(device).eval()
    return model, _ModelInput.from_config(config)


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Float32 logits of a model in eval mode."""
    import torch

    with torch.no_grad(), autocast(inputs.device):
        return model(inputs).float()


def _split(count: int, parameters: dict[str, Any], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, validation) image indices: a seeded permutation, its first
    `validation_fraction` (one image at least) held out. Training and the gate's evaluation both
    draw it here, so the same seed holds out the same images."""
    import torch

    order = torch.randperm(count, generator=_generator(seed, _SPLIT, 0))
    validation = max(1, round(count * parameters["validation_fraction"]))
    return order[validation:], order[:validation]


def _generator(seed: int, stream: int, index: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(derived_seed(seed, stream * 2**40 + index))


def _augment(inputs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image flipped left to right with probability 1/2 and cropped back to its size at a
    random offset from a copy padded by an eighth of its side with zeros (the mean colour,
    after standardisation)."""
    import torch
    import torch.nn.functional as F

    count, _, size, _ = inputs.shape
    pad = max(1, size // 8)
    flips = (torch.rand(count, generator=generator) < 0.5).to(inputs.device)
    offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator).to(inputs.device)
    span = torch.arange(size, device=inputs.device)
    rows = (offsets[:, 0, None] + span)[:, :, None]
    columns = (offsets[:, 1, None] + span)[:, None, :]
    batch = torch.arange(count, device=inputs.device)[:, None, None]
    padded = F.pad(inputs, (pad, pad, pad, pad)).permute(0, 2, 3, 1)
    cropped = padded[batch, rows, columns].permute(0, 3, 1, 2)
    # The crop is laid out channels-last; back to the model's usual layout, because the CPU
    # kernels of torch 2.13 corrupt the heap training on channels-last batches with several
    # threads (a worker's child has a slot's share of the cores).
    return torch.where(flips[:, None, None, None], cropped.flip(3), cropped).contiguous()


class _Trainer(Trainer):
    """The image classifier's training run (see Trainer)."""

    recipe = ImageClassifier

    def __init__(
        self,
        ctx: RecipeContext,
        model_input: _ModelInput,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        super().__init__(ctx)
        self.model_input = model_input
        self.architecture = model_input.architecture(ctx.parameters)
        # Pixels stay on the CPU in their compact type; each batch is moved and standardised.
        self.train_pixels, self.train_targets = train
        self.val_pixels, self.val_targets = val[0], val[1].to(self.device)
        self.batches = math.ceil(len(self.train_targets) / self.batch_size)
        self._start_model(_build_model, self.architecture, self.parameters["learning_rate"])

    def _epoch_order(self) -> torch.Tensor:
        import torch

        generator = _generator(self.ctx.seed, _SHUFFLE, self.epoch)
        return torch.randperm(len(self.train_targets), generator=generator)

    def _train_step(self, rows: torch.Tensor) -> None:
        import torch.nn.functional as F

        inputs = self.model_input.normalise(self.train_pixels[rows], self.device)
        if self.parameters["augment"]:
            # A generator per step rather than one carried along: a resumed run needs no saved
            # generator state to draw the same flips and crops.
            inputs = _augment(inputs, _generator(self.ctx.seed, _AUGMENT, self.step))
        targets = self.train_targets[rows].to(self.device, non_blocking=True)
        with self.autocast:
            logits = self.model(inputs)
        self._step(F.cross_entropy(logits.float(), targets))

    def _val_metrics(self) -> dict[str, float]:
        import torch.nn.functional as F

        self.model.eval()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(self.val_targets), CHUNK_IMAGES):
            inputs = self.model_input.normalise(
                self.val_pixels[start : start + CHUNK_IMAGES], self.device
            )
            targets = self.val_targets[start : start + CHUNK_IMAGES]
            logits = _logits(self.model, inputs)
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == targets).sum())
        self.model.train()
        return {
            "loss": loss_sum / len(self.val_targets),
            "accuracy": correct / len(self.val_targets),
        }

    def _result(self) -> RecipeResult:
        artifacts = self._write_best_model(self.model_input.config(self.architecture))
        return RecipeResult(
            self._best_epoch_metrics(), artifacts, self.model_input.input_signature()
        )

    def _identity(self) -> dict[str, Any]:
        return {
            "classes": self.model_input.classes,
            "channels": self.model_input.channels,
            "images": [len(self.train_targets), len(self.val_targets)],
        }
