"""Edge export time per recipe (jobs.recipes.onnx_export.export_bundle: the ONNX export, the
bundle written, and its self-check through run.py against the online predictor), against two
baselines measured in the same run on the same model:

- dynamo: torch.onnx.export(dynamo=True) of the same wrapped network, the exporter we do not use
  for the networks the TorchScript one exports right (all but the text transformer, which the
  TorchScript tracer fixes to the example's shapes, so the export always takes dynamo there);
- load: loading the recipe's online predictor and answering the same sample inputs, what a
  replica does when it starts.

    .venv/bin/python -m bench.edge_export           # 3 runs of each, medians
    .venv/bin/python -m bench.edge_export --runs 1  # smoke check

Each model is trained here first, small (the tests' sizes), on the recipe's sample data, on the
CPU with one torch thread, as the job's child runs. The table goes to stdout, ending with one
`RESULT {json}` line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROWS = 300
CASES = {
    "tabular": ("tabular", {"target": "label", "epochs": 2, "hidden_sizes": [8]}),
    "text-bag": (
        "text",
        {"text_column": "text", "target": "label", "epochs": 2, "embedding_dim": 8},
    ),
    "text-transformer": (
        "text",
        {
            "text_column": "text",
            "target": "label",
            "epochs": 2,
            "embedding_dim": 8,
            "model": "transformer",
            "max_length": 16,
        },
    ),
    "images": ("images", {"image_size": 16, "epochs": 1, "batch_size": 16, "width": 4}),
    "timeseries-mlp": ("timeseries", {"window": 24, "horizon": 6, "epochs": 2, "hidden_size": 8}),
    "timeseries-gru": (
        "timeseries",
        {"window": 24, "horizon": 6, "epochs": 2, "hidden_size": 8, "model": "gru"},
    ),
}


def _train(kind: str, parameters: dict, folder: Path) -> Path:
    from jobs.recipes.base import RecipeContext, validate_parameters
    from jobs.recipes.images import ImageClassifier
    from jobs.recipes.tabular import TabularClassifier
    from jobs.recipes.text import TextClassifier
    from jobs.recipes.timeseries import TimeSeriesForecaster
    from jobs.samples.images import write_image_sample
    from jobs.samples.tabular import write_tabular_sample
    from jobs.samples.text import write_text_sample
    from jobs.samples.timeseries import write_timeseries_sample

    recipe, dataset, dataset_format = {
        "tabular": (TabularClassifier, folder / "data.csv", "csv"),
        "text": (TextClassifier, folder / "data.csv", "csv"),
        "images": (ImageClassifier, folder / "data.zip", "image_folder_zip"),
        "timeseries": (TimeSeriesForecaster, folder / "data.csv", "csv"),
    }[kind]
    {
        "tabular": lambda: write_tabular_sample(dataset, rows=ROWS, seed=1),
        "text": lambda: write_text_sample(dataset, rows=ROWS, seed=3),
        "images": lambda: write_image_sample(dataset, per_class=12, size=16, seed=2),
        "timeseries": lambda: write_timeseries_sample(dataset, points=24 * 20, seed=1),
    }[kind]()
    ctx = RecipeContext(
        workdir=folder,
        dataset_path=dataset,
        dataset_format=dataset_format,
        parameters=validate_parameters(recipe, parameters),
        seed=3,
        output_dir=folder / "model",
        checkpoint_dir=folder / "checkpoints",
        checkpoint_every_s=3600.0,
        devices=["cpu"],
        emit=lambda line: None,
    )
    recipe().train(ctx)
    return ctx.output_dir


def _dynamo_s(model_dir: Path) -> float:
    import torch

    from jobs.recipes.onnx_export import _GRAPHS, OPSET

    config = json.loads((model_dir / "config.json").read_text())
    graph = _GRAPHS[config["recipe"]](model_dir, config)
    started = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(
            graph.module.eval(),
            graph.example,
            input_names=list(graph.dynamic_axes),
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
        program.save(io.BytesIO())
    return time.perf_counter() - started


def _load_s(model_dir: Path) -> float:
    from jobs.recipes.catalog import get_recipe
    from jobs.recipes.onnx_export import _GRAPHS

    config = json.loads((model_dir / "config.json").read_text())
    samples = _GRAPHS[config["recipe"]](model_dir, config).samples
    started = time.perf_counter()
    get_recipe(config["recipe"]).online_predictor(model_dir)(samples)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    import torch

    from jobs.recipes.onnx_export import export_bundle

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        for name, (kind, parameters) in CASES.items():
            folder = Path(tmp) / name
            folder.mkdir()
            print(f"{name}: training", file=sys.stderr)
            model_dir = _train(kind, parameters, folder)
            totals, exports, checks, dynamos, loads = [], [], [], [], []
            for run in range(runs):
                started = time.perf_counter()
                check = export_bundle(model_dir, folder / f"edge-{run}.zip", log=lambda _: None)
                totals.append(time.perf_counter() - started)
                exports.append(check["export_s"])
                checks.append(check["check_s"])
                dynamos.append(_dynamo_s(model_dir))
                loads.append(_load_s(model_dir))
            results[name] = {
                "total_s": round(statistics.median(totals), 3),
                "export_s": round(statistics.median(exports), 3),
                "check_s": round(statistics.median(checks), 3),
                "dynamo_export_s": round(statistics.median(dynamos), 3),
                "online_load_s": round(statistics.median(loads), 3),
                "bundle_kb": round((folder / "edge-0.zip").stat().st_size / 1024, 1),
                "max_difference": check["max_difference"],
            }
    print(f"Edge export, median of {runs} runs per model (CPU, one torch thread)\n")
    print(
        f"  {'model':<18}{'export+check':>13}{'export':>9}{'check':>8}"
        f"{'dynamo':>9}{'load':>8}{'zip KB':>9}{'max diff':>10}"
    )
    for name, r in results.items():
        print(
            f"  {name:<18}{r['total_s']:>12.2f}s{r['export_s']:>8.2f}s{r['check_s']:>7.2f}s"
            f"{r['dynamo_export_s']:>8.2f}s{r['online_load_s']:>7.2f}s{r['bundle_kb']:>9.1f}"
            f"{r['max_difference']:>10.1e}"
        )
    print(f"RESULT {json.dumps(results)}")


if __name__ == "__main__":
    main()
