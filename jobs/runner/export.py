"""The `export` task of a job's child: the model in `model_dir` written as an ONNX edge bundle
(jobs.recipes.onnx_export), which checks itself before the result is printed. The result line
names the bundle and carries the check's figures as metrics:

    @@result {"metrics": {"samples": 16, "max_difference": 3e-08, "tolerance": "...",
              "export_s": 0.4, "check_s": 0.2, "onnx_bytes": 20480},
              "artifacts": {"edge-bundle.zip": "output/edge-bundle.zip"}, ...}

A bundle that disagrees with the model fails the child with EXIT_BAD_INPUT and the difference
(ExportMismatch), and nothing is printed for the parent to store. No Django here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.recipes.onnx_export import BUNDLE_FILENAME, export_bundle

from .protocol import EXIT_OK, format_line


def _emit(line: str) -> None:
    print(line, flush=True)


def export_run(workdir: Path, spec: dict[str, Any]) -> int:
    output = workdir / spec["output_dir"] / BUNDLE_FILENAME
    check = export_bundle(
        workdir / spec["model_dir"],
        output,
        source=str(spec["parameters"].get("source", "")),
        log=_emit,
    )
    result = {
        "metrics": check,
        "artifacts": {BUNDLE_FILENAME: output.relative_to(workdir).as_posix()},
        "input_signature": {},
        "parameters": spec["parameters"],
    }
    _emit(format_line("result", result))
    return EXIT_OK
