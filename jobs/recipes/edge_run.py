"""Runs an edge bundle's model.onnx on inputs shaped like the platform's online predictions, with
numpy and onnxruntime only (Pillow too, for encoded images): copied into every bundle as run.py.

    python run.py inputs.json          # a JSON list of inputs; prints a JSON list of outputs

or, from Python, `predict = load("path/to/bundle")` then `predict([{"text": "..."}])`. Inputs and
outputs are those of the model's online API (see the bundle's README.md); preprocessing.json
holds everything the preprocessing needs. It imports nothing of the platform that made it.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime

Predictor = Callable[[list[Any]], list[dict[str, Any]]]


def load(bundle: str | Path = ".") -> Predictor:
    """The bundle's predictor: a function from a list of inputs to a list of outputs."""
    folder = Path(bundle)
    config = json.loads((folder / "preprocessing.json").read_text(encoding="utf-8"))
    session = onnxruntime.InferenceSession(
        str(folder / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    return _PREDICTORS[config["recipe"]](session, config)


def _run(session: onnxruntime.InferenceSession, feeds: dict[str, np.ndarray]) -> np.ndarray:
    # An input the graph does not use (a table without text columns) was pruned from it.
    used = {node.name for node in session.get_inputs()}
    return session.run(None, {name: value for name, value in feeds.items() if name in used})[0]


def _field(item: Any, position: int, key: str, kind: type, what: str) -> Any:
    if not isinstance(item, dict):
        raise ValueError(f'inputs[{position}] must be an object like {{"{key}": {what}}}.')
    value = item.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(f"inputs[{position}].{key} must be {what}.")
    return value


def _classes(config: dict[str, Any], probabilities: np.ndarray) -> list[dict[str, Any]]:
    classes = config["classes"]
    return [
        {
            "label": str(classes[int(np.argmax(row))]),
            "probabilities": {str(c): float(p) for c, p in zip(classes, row, strict=True)},
        }
        for row in probabilities.astype(np.float64)
    ]


def _tabular(session: onnxruntime.InferenceSession, config: dict[str, Any]) -> Predictor:
    """Rows of column name to value; numbers standardized, text looked up in its vocabulary
    (0 for a value it lacks or a missing one), a missing number read as the training mean."""
    columns = config["columns"]
    vocabularies = {
        spec["name"]: {value: index for index, value in enumerate(spec["vocabulary"], 1)}
        for spec in columns
        if spec["encoding"] == "embedding"
    }

    def predict(inputs: list[Any]) -> list[dict[str, Any]]:
        if not inputs:
            return []
        numeric, categorical = [], []
        for position, row in enumerate(inputs):
            if not isinstance(row, dict):
                raise ValueError(f"inputs[{position}] must be an object of column values.")
            numbers, indices = [], []
            for spec in columns:
                if spec["name"] not in row:
                    raise ValueError(f"inputs[{position}] has no column {spec['name']!r}.")
                value = row[spec["name"]]
                if spec["encoding"] == "embedding":
                    index = vocabularies[spec["name"]].get(value, 0) if value is not None else 0
                    indices.append(index)
                elif value is None or not math.isfinite(float(value)):
                    numbers.append(0.0)
                else:
                    numbers.append((float(value) - spec["mean"]) / spec["std"])
            numeric.append(numbers)
            categorical.append(indices)
        rows = len(inputs)
        feeds = {
            "numeric": np.array(numeric, dtype=np.float32).reshape(rows, -1),
            "categorical": np.array(categorical, dtype=np.int64).reshape(rows, -1),
        }
        return _classes(config, _run(session, feeds))

    return predict


def _text(session: onnxruntime.InferenceSession, config: dict[str, Any]) -> Predictor:
    """`{"text": "..."}`: lowercased, cut into tokens by the pattern, the first max_length kept,
    each the index of its vocabulary entry (the unknown one else); rows padded with `pad`."""
    pattern = re.compile(config["token_pattern"])
    index = {token: position for position, token in enumerate(config["vocabulary"])}
    unknown, pad, longest = config["unknown"], config["pad"], config["max_length"]

    def ids(text: str) -> list[int]:
        tokens = pattern.findall(text.lower())[:longest]
        return [index.get(token, unknown) for token in tokens] or [unknown]

    def predict(inputs: list[Any]) -> list[dict[str, Any]]:
        rows = [ids(_field(item, i, "text", str, "text")) for i, item in enumerate(inputs)]
        if not rows:
            return []
        matrix = np.full((len(rows), max(map(len, rows))), pad, dtype=np.int64)
        for position, row in enumerate(rows):
            matrix[position, : len(row)] = row
        return _classes(config, _run(session, {"ids": matrix}))

    return predict


def _image_pixels(item: Any, position: int, size: int) -> np.ndarray:
    """uint8 (size, size, channels) from `{"pixels": nested lists}` or `{"image": base64}` (a
    PNG, JPEG... file, decoded by Pillow and resized with its bilinear filter when its size is
    not the model's: the platform resizes with torch, so resized images score slightly apart)."""
    if isinstance(item, dict) and "pixels" in item:
        pixels = np.asarray(item["pixels"], dtype=np.uint8)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    else:
        from PIL import Image

        data = base64.b64decode(_field(item, position, "image", str, "base64 of an image file"))
        with Image.open(io.BytesIO(data)) as image:
            if image.mode not in ("L", "LA", "RGB", "RGBA"):
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
        pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if pixels.ndim != 3 or pixels.shape[:2] != (size, size) or pixels.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"inputs[{position}] must be {size} x {size} pixels of 1 to 4 channels.")
    return pixels


def _images(session: onnxruntime.InferenceSession, config: dict[str, Any]) -> Predictor:
    """Images at the model's size; alpha dropped, gray repeated to RGB or RGB turned to gray
    (BT.601 luma), then scaled to 0-1 and standardized per channel."""
    size, channels = config["image_size"], config["channels"]
    mean = np.array(config["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.array(config["std"], dtype=np.float32).reshape(1, -1, 1, 1)

    def converted(pixels: np.ndarray) -> np.ndarray:
        if pixels.shape[2] in (2, 4):
            pixels = pixels[..., :-1]
        if pixels.shape[2] == 1 and channels == 3:
            pixels = np.repeat(pixels, 3, axis=2)
        elif pixels.shape[2] == 3 and channels == 1:
            pixels = (pixels @ np.array([0.299, 0.587, 0.114])).round()[..., None]
        return pixels.astype(np.float32).transpose(2, 0, 1)

    def predict(inputs: list[Any]) -> list[dict[str, Any]]:
        if not inputs:
            return []
        batch = np.stack([converted(_image_pixels(item, i, size)) for i, item in enumerate(inputs)])
        return _classes(config, _run(session, {"pixels": (batch / 255 - mean) / std}))

    return predict


def _timeseries(session: onnxruntime.InferenceSession, config: dict[str, Any]) -> Predictor:
    """`{"history": [...], "series": "name"}`: the last `window` values, scaled by the series'
    training mean and standard deviation (a series the model does not know: by those of the
    window itself); the forecast is scaled back."""
    window = config["window"]
    known = {entry["series"]: (entry["mean"], entry["std"]) for entry in config["series"]}

    def scaling(values: list[float]) -> tuple[float, float]:
        mean = math.fsum(values) / len(values)
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / len(values))
        return mean, std if std > 1e-12 else 1.0

    def predict(inputs: list[Any]) -> list[dict[str, Any]]:
        if not inputs:
            return []
        recent, stats = [], []
        for position, item in enumerate(inputs):
            values = _field(item, position, "history", list, "a list of numbers")
            if len(values) < window:
                raise ValueError(f"inputs[{position}].history needs at least {window} values.")
            values = [float(value) for value in values[-window:]]
            recent.append(values)
            stats.append(known.get(item.get("series")) or scaling(values))
        mean, std = np.array(stats, dtype=np.float64).T[:, :, None]
        scaled = ((np.array(recent, dtype=np.float64) - mean) / std).astype(np.float32)
        forecast = _run(session, {"window": scaled}).astype(np.float64) * std + mean
        return [{"forecast": row.tolist()} for row in forecast]

    return predict


_PREDICTORS = {
    "tabular-classifier": _tabular,
    "text-classifier": _text,
    "image-classifier": _images,
    "timeseries-forecaster": _timeseries,
}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python run.py inputs.json")
    items = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    json.dump(load(Path(__file__).resolve().parent)(items), sys.stdout)
    sys.stdout.write("\n")
