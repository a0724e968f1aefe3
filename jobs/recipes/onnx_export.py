"""Edge export: a model version of a built-in recipe as a zip that runs without the platform
(model.onnx from torch's exporter, preprocessing.json, run.py on numpy and onnxruntime, a README).

The export checks itself before it is stored: the bundle's own run.py and the recipe's
`online_predictor` (torch) answer the same sample inputs, drawn from the model's config, and
every output must agree within the stated tolerance, or the export fails with the largest
difference shown. The check goes through run.py, so it covers the numpy preprocessing as well as
the ONNX graph. Each recipe's network and preprocessing are its own module's; this module only
wraps them for the exporter. torch is imported inside the functions, like the recipes do.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import math
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.recipes.base import CONFIG_FILENAME, OnlinePredictor, RecipeInputError
from jobs.recipes.catalog import get_recipe

if TYPE_CHECKING:
    import torch
    from torch import nn

BUNDLE_FILENAME = "edge-bundle.zip"
RUNNER = Path(__file__).with_name("edge_run.py")
OPSET = 18
# The stated tolerance: a class probability may differ from the platform's by 1e-4; a forecast
# value by 1e-4 plus 1e-3 of its size (numpy.isclose's rule), float32 on both sides.
PROBABILITY_ATOL = 1e-4
FORECAST_ATOL, FORECAST_RTOL = 1e-4, 1e-3
SAMPLES = 16
SAMPLE_SEED = 20261206


class ExportMismatch(RecipeInputError):
    """The bundle answers the sample inputs other than the platform's model does."""


@dataclass
class _Graph:
    """What the exporter needs of one recipe's model, and what the bundle's runner needs."""

    module: nn.Module
    example: tuple[torch.Tensor, ...]
    dynamic_axes: dict[str, dict[int, str]]
    preprocessing: dict[str, Any]
    samples: list[Any]
    inputs_words: str
    # The TorchScript tracer fixes the shapes inside multi-head attention to the example's;
    # torch.export (dynamo) keeps them symbolic.
    dynamo: bool = False


def export_bundle(
    model_dir: Path, output: Path, *, source: str = "", log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Write the edge bundle of the model in `model_dir` (a version's model.safetensors and
    config.json) to the zip `output`, after checking it; returns the check's figures.
    ExportMismatch when the bundle disagrees with the platform's model."""
    config = json.loads((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    recipe = get_recipe(str(config.get("recipe")))
    if recipe.name not in _GRAPHS:
        raise RecipeInputError(f"Recipe {recipe.name!r} has no edge export.")
    started = time.perf_counter()
    graph = _GRAPHS[recipe.name](model_dir, config)
    with tempfile.TemporaryDirectory(prefix="edge-") as folder_name:
        folder = Path(folder_name)
        _export_onnx(graph, folder / "model.onnx")
        exported_s = time.perf_counter() - started
        preprocessing = {"recipe": recipe.name, "recipe_version": recipe.version}
        (folder / "preprocessing.json").write_text(
            json.dumps(preprocessing | graph.preprocessing, indent=1), encoding="utf-8"
        )
        shutil.copyfile(RUNNER, folder / "run.py")
        reference = recipe.online_predictor(model_dir)
        check = bundle_check(folder, reference, graph.samples)
        check |= {
            "export_s": round(exported_s, 3),
            "check_s": round(time.perf_counter() - started - exported_s, 3),
            "onnx_bytes": (folder / "model.onnx").stat().st_size,
        }
        (folder / "README.md").write_text(
            _readme(recipe.name, source, graph.inputs_words, check), encoding="utf-8"
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            for name in ("model.onnx", "preprocessing.json", "run.py", "README.md"):
                bundle.write(folder / name, name)
    log(
        f"Exported to ONNX in {check['export_s']:.2f} s; on {check['samples']} sample inputs the "
        f"bundle is within {check['tolerance']} of the platform's model (largest difference "
        f"{check['max_difference']:.3g})."
    )
    return check


def bundle_check(folder: Path, reference: OnlinePredictor, samples: list[Any]) -> dict[str, Any]:
    """Run the bundle in `folder` through its own run.py and `reference` on `samples`; the
    largest difference and the tolerance, or ExportMismatch saying where they part."""
    spec = importlib.util.spec_from_file_location("edge_bundle_run", folder / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    edge = runner.load(folder)(samples)
    platform = reference(samples)
    worst = (0.0, 0.0, "")  # (difference / tolerance, difference, where)
    for position, (ours, theirs) in enumerate(zip(edge, platform, strict=True)):
        for where, value, expected, tolerance in _paired(ours, theirs):
            if not math.isfinite(expected):
                raise ExportMismatch(
                    f"The model's own output at sample {position} {where} is {expected}, not a "
                    "number the bundle can be checked against; the export was not stored."
                )
            difference = abs(value - expected)
            if not math.isfinite(difference):
                difference = math.inf
            if difference / tolerance > worst[0] or not worst[2]:
                where = f"sample {position} {where} (bundle {value:.6g}, platform {expected:.6g})"
                worst = (difference / tolerance, difference, where)
    forecasts = bool(platform) and "forecast" in platform[0]
    stated = (
        f"atol {FORECAST_ATOL:g} + rtol {FORECAST_RTOL:g}"
        if forecasts
        else f"atol {PROBABILITY_ATOL:g} on probabilities"
    )
    if worst[0] > 1:
        raise ExportMismatch(
            f"The ONNX bundle's outputs differ from the platform model's beyond the tolerance "
            f"({stated}): the largest difference is {worst[1]:.3g}, at {worst[2]}. The export "
            "was not stored."
        )
    return {"samples": len(samples), "max_difference": worst[1], "tolerance": stated}


def _paired(ours: dict[str, Any], theirs: dict[str, Any]):
    """(where, bundle value, platform value, tolerance) for each number of one output."""
    if "forecast" in theirs:
        if len(ours["forecast"]) != len(theirs["forecast"]):
            raise ExportMismatch("The bundle forecasts another number of steps than the model.")
        for step, (value, expected) in enumerate(
            zip(ours["forecast"], theirs["forecast"], strict=True)
        ):
            yield (
                f"forecast step {step + 1}",
                value,
                expected,
                FORECAST_ATOL + FORECAST_RTOL * abs(expected),
            )
        return
    if ours["probabilities"].keys() != theirs["probabilities"].keys():
        raise ExportMismatch("The bundle predicts other classes than the model.")
    for label, expected in theirs["probabilities"].items():
        yield f"probability of {label!r}", ours["probabilities"][label], expected, PROBABILITY_ATOL


def _export_onnx(graph: _Graph, path: Path) -> None:
    """torch's TorchScript-based exporter (dynamo=False) where it gives a graph of any batch
    size: on these small networks it takes a fraction of the dynamo exporter's time. The
    transformer goes through torch.export (dynamo=True), whose shapes stay symbolic."""
    import torch

    names = list(graph.dynamic_axes)
    # The fused fast path of the transformer layers has no ONNX form; the plain path computes
    # the same function.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            if graph.dynamo:
                program = torch.onnx.export(
                    graph.module.eval(),
                    graph.example,
                    input_names=names,
                    output_names=["output"],
                    # One entry, for the wrapper's *inputs.
                    dynamic_shapes=(
                        tuple(
                            dict.fromkeys(axes, torch.export.Dim.DYNAMIC)
                            for axes in graph.dynamic_axes.values()
                        ),
                    ),
                    opset_version=OPSET,
                    dynamo=True,
                    verbose=False,
                )
                program.save(str(path))
                return
            torch.onnx.export(
                graph.module.eval(),
                graph.example,
                str(path),
                input_names=names,
                output_names=["output"],
                dynamic_axes=graph.dynamic_axes | {"output": {0: "rows"}},
                opset_version=OPSET,
                dynamo=False,
            )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _wrapped(forward: Callable[..., torch.Tensor], *modules: nn.Module) -> nn.Module:
    """A module whose forward is `forward(*inputs)`, holding `modules` (their weights)."""
    from torch import nn

    class Edge(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = nn.ModuleList(modules)

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return forward(*inputs)

    return Edge()


def _rng():
    import numpy as np

    return np.random.default_rng(SAMPLE_SEED)


def _tabular(model_dir: Path, config: dict[str, Any]) -> _Graph:
    import torch

    from jobs.recipes.tabular import Preprocessing, _load_network

    network = _load_network(model_dir, config, torch.device("cpu")).eval()
    preprocessing = Preprocessing.from_config(config)
    rng = _rng()
    samples = []
    for row in range(SAMPLES):
        sample: dict[str, Any] = {}
        for spec in preprocessing.columns:
            if row % 7 == 6:  # some missing values
                value = None
            elif spec["encoding"] == "embedding":
                known = spec["vocabulary"]
                pick = int(rng.integers(len(known) + 1))
                value = known[pick] if pick < len(known) else "a value it never saw"
            elif spec["dtype"] == "bool":
                value = bool(rng.integers(2))
            else:
                value = spec["mean"] + spec["std"] * float(rng.normal()) * 2
                value = round(value) if spec["dtype"] == "int64" else value
            sample[spec["name"]] = value
        samples.append(sample)
    numeric = sum(spec["encoding"] == "standardize" for spec in preprocessing.columns)
    return _Graph(
        module=_wrapped(lambda n, c: network(n, c).softmax(dim=1), network),
        example=(
            torch.zeros((2, numeric)),
            torch.zeros((2, len(preprocessing.columns) - numeric), dtype=torch.int64),
        ),
        dynamic_axes={"numeric": {0: "rows"}, "categorical": {0: "rows"}},
        preprocessing={
            "target": preprocessing.target,
            "classes": preprocessing.classes,
            "columns": preprocessing.columns,
        },
        samples=samples,
        inputs_words='rows, objects of column name to value: {"age": 41, "plan": "pro"} '
        "(null for a missing value)",
    )


def _text(model_dir: Path, config: dict[str, Any]) -> _Graph:
    import torch

    from jobs.recipes.text import PAD, TOKEN_PATTERN, UNKNOWN, _forward, _load_model_dir

    model, config, tokenizer, _ = _load_model_dir(model_dir, torch.device("cpu"))
    model.eval()
    architecture = config["architecture"]

    def probabilities(ids: torch.Tensor) -> torch.Tensor:
        if architecture["model"] == "embedding_bag":
            # EmbeddingBag's mean skipping PAD has no ONNX form: the same mean, spelled out.
            present = (ids != PAD).unsqueeze(-1).float()
            vectors = torch.nn.functional.embedding(ids, model["embedding"].weight)
            pooled = (vectors * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)
            logits = model["classifier"](model["norm"](pooled))
        else:
            logits = _forward(model, architecture, ids)
        return logits.softmax(dim=1)

    rng = _rng()
    words = tokenizer.vocabulary[len([PAD, UNKNOWN]) :] or ["word"]
    texts = ["", "Words it never saw!", " ".join(words[:3]).upper() + " ?!"]
    while len(texts) < SAMPLES:
        length = int(rng.integers(1, tokenizer.max_length + 6))
        texts.append(" ".join(words[int(i)] for i in rng.integers(len(words), size=length)))
    return _Graph(
        module=_wrapped(probabilities, model),
        example=(torch.full((2, 3), UNKNOWN, dtype=torch.int64),),
        dynamic_axes={"ids": {0: "rows", 1: "tokens"}},
        preprocessing={
            "classes": config["classes"],
            "token_pattern": TOKEN_PATTERN.pattern,
            "lowercase": True,
            "vocabulary": tokenizer.vocabulary,
            "max_length": tokenizer.max_length,
            "pad": PAD,
            "unknown": UNKNOWN,
        },
        samples=[{"text": text} for text in texts],
        inputs_words='texts: {"text": "..."}',
        dynamo=architecture["model"] == "transformer",
    )


def _images(model_dir: Path, config: dict[str, Any]) -> _Graph:
    import torch
    from PIL import Image

    from jobs.recipes.images import _load_model_dir

    model, model_input = _load_model_dir(model_dir, torch.device("cpu"))
    size, channels = model_input.size, model_input.channels
    rng = _rng()
    samples = []
    for index in range(SAMPLES // 2):
        # The model's own channels, and the conversions the platform makes: gray <-> RGB, alpha.
        depth = [channels, 4 if channels == 3 else 2, 1 if channels == 3 else 3][index % 3]
        pixels = rng.integers(0, 256, size=(size, size, depth), dtype="uint8")
        mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[depth]
        encoded = io.BytesIO()
        Image.fromarray(pixels[..., 0] if depth == 1 else pixels, mode=mode).save(encoded, "PNG")
        samples.append({"image": base64.b64encode(encoded.getvalue()).decode()})
    return _Graph(
        module=_wrapped(lambda pixels: model(pixels).softmax(dim=1), model),
        example=(torch.zeros((2, channels, size, size)),),
        dynamic_axes={"pixels": {0: "rows"}},
        preprocessing={
            "classes": model_input.classes,
            "image_size": size,
            "channels": channels,
            "pixel_scale": 255,
            "mean": model_input.mean,
            "std": model_input.std,
        },
        samples=samples,
        inputs_words=f'{size} x {size} images: {{"image": base64 of a PNG or JPEG file}} '
        '(Pillow decodes it) or {"pixels": [[[r, g, b], ...], ...]} as uint8',
    )


def _timeseries(model_dir: Path, config: dict[str, Any]) -> _Graph:
    import torch

    from jobs.recipes.timeseries import _forward, _load_model_dir

    model, config, _ = _load_model_dir(model_dir, torch.device("cpu"))
    model.eval()
    architecture = config["architecture"]
    window = architecture["window"]
    rng = _rng()
    samples = []
    known = config["series"][:SAMPLES]
    for index in range(SAMPLES):
        entry = known[index % len(known)] if index < SAMPLES - 2 else None
        mean, std = (entry["mean"], entry["std"]) if entry else (100.0, 10.0)
        history = (mean + std * rng.normal(size=window + index % 3)).tolist()
        sample: dict[str, Any] = {"history": history}
        if entry is not None and entry["series"] is not None:
            sample["series"] = entry["series"]
        elif index == SAMPLES - 1:
            sample["series"] = "a series it never saw"
        samples.append(sample)
    return _Graph(
        module=_wrapped(lambda values: _forward(model, architecture, values), model),
        example=(torch.zeros((2, window)),),
        dynamic_axes={"window": {0: "rows"}},
        preprocessing={
            "window": window,
            "horizon": architecture["horizon"],
            "series": [
                {"series": one["series"], "mean": one["mean"], "std": one["std"]}
                for one in config["series"]
            ],
        },
        samples=samples,
        inputs_words=f'series: {{"history": [at least {window} values, oldest first], '
        '"series": "its name"}',
    )


_GRAPHS: dict[str, Callable[[Path, dict[str, Any]], _Graph]] = {
    "tabular-classifier": _tabular,
    "text-classifier": _text,
    "image-classifier": _images,
    "timeseries-forecaster": _timeseries,
}


EXPORTABLE_RECIPES = frozenset(_GRAPHS)


def _readme(recipe: str, source: str, inputs_words: str, check: dict[str, Any]) -> str:
    outputs = (
        '{"forecast": [value, ...]}'
        if recipe == "timeseries-forecaster"
        else '{"label": class, "probabilities": {class: p, ...}}'
    )
    made_from = f" from model version {source}" if source else ""
    return f"""# Edge bundle{made_from}

Made by the {recipe} recipe's edge export. It needs Python 3.10+, numpy and onnxruntime
(`pip install numpy onnxruntime`), and Pillow for encoded images; nothing of the platform.

- `model.onnx`: the network (ONNX opset {OPSET}).
- `preprocessing.json`: what turns inputs into the network's tensors.
- `run.py`: the preprocessing and the network, from the command line or from Python.

    python run.py inputs.json

where inputs.json is a JSON list of {inputs_words}. It prints a JSON list with one
{outputs} per input, as the platform's online predictions do. From Python:
`import run; predict = run.load("."); predict([...])`.

The export checked itself on {check["samples"]} sample inputs against the platform's own model:
every output agreed within {check["tolerance"]}; the largest difference was
{check["max_difference"]:.3g}.
"""
