"""The predict entry: load the model once, then answer lists of images.

An input is an 8x8 image of brightness values, given either as `{"pixels": [64 numbers]}` (row
by row; an online request) or as the 64 columns `p0` ... `p63` of a dataset row (batch
inference over a CSV or Parquet file). An output is `{"label": "horizontal" | "vertical",
"probabilities": {label: p}}`, the shape the platform's classifiers answer in, so the
deployment's live accuracy counts the feedback sent for it.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import factory_job

from .model import SIZE, TinyCNN

LABELS = ("horizontal", "vertical")
COLUMNS = [f"p{i}" for i in range(SIZE * SIZE)]


def load(model_dir: str):
    folder = Path(model_dir)
    config = json.loads((folder / "config.json").read_text())
    model = TinyCNN(config["channels"])
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.eval()

    def predict(inputs: list) -> list:
        images = torch.tensor([_pixels(item, i) for i, item in enumerate(inputs)])
        with torch.no_grad():
            probabilities = model(images.view(-1, 1, SIZE, SIZE)).softmax(dim=1)
        return [
            {
                "label": LABELS[int(row.argmax())],
                "probabilities": {
                    label: round(float(p), 6) for label, p in zip(LABELS, row, strict=True)
                },
            }
            for row in probabilities
        ]

    return predict


def _pixels(item, index: int) -> list[float]:
    """The input's 64 values; BadInput (the caller's 400, in these words) for anything else."""
    if not isinstance(item, dict):
        raise factory_job.BadInput(f"inputs[{index}] is not an object.")
    values = item["pixels"] if "pixels" in item else [item.get(name) for name in COLUMNS]
    if (
        not isinstance(values, list)
        or len(values) != SIZE * SIZE
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    ):
        raise factory_job.BadInput(
            f"inputs[{index}] needs 64 numbers: pixels (a list) or the columns p0 to p63."
        )
    return [float(v) for v in values]
