"""The job's child process, `python -m jobs.runner.child <workdir>`: trains one recipe on the
files in the working directory.

It talks to its parent, the GPU worker, only through stdout lines, stderr and files (see
jobs.runner.protocol); no Django, no database, no network. Exit codes are protocol.EXIT_*.
"""

from __future__ import annotations

import argparse
import ctypes
import signal
import sys
import threading
import traceback
from pathlib import Path

from jobs.recipes.base import (
    RecipeContext,
    RecipeInputError,
    load_checkpoint,
    validate_parameters,
)
from jobs.recipes.registry import get_recipe
from jobs.runner.protocol import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    SpecError,
    format_line,
    read_spec,
)
from tenants.errors import DomainError

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def main(argv: list[str] | None = None) -> int:
    stop = threading.Event()
    # Installed before the slow imports, so that an early SIGTERM still ends in EXIT_STOPPED.
    # The handler only raises the flag: the recipe checkpoints and returns at its next step.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    _die_with_parent()
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(prog="python -m jobs.runner.child", description=__doc__)
    parser.add_argument("workdir", type=Path, help="the directory holding spec.json")
    workdir = parser.parse_args(argv).workdir.resolve()
    try:
        return _run(workdir, stop)
    except (DomainError, RecipeInputError) as exc:
        _report(exc)
        return EXIT_BAD_INPUT
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILED
    except Exception:
        traceback.print_exc()
        return EXIT_FAILED


def _run(workdir: Path, stop: threading.Event) -> int:
    spec = read_spec(workdir)
    recipe_cls = get_recipe(spec["recipe"])
    parameters = validate_parameters(recipe_cls, spec["parameters"])
    dataset_format = spec["dataset"]["format"]
    if dataset_format not in recipe_cls.dataset_formats:
        raise RecipeInputError(
            f"Recipe {recipe_cls.name!r} trains on {', '.join(recipe_cls.dataset_formats)} "
            f"datasets, not {dataset_format}."
        )
    # torch loads only once the cheap checks passed: a bad request fails in milliseconds.
    import torch

    torch.manual_seed(spec["seed"])
    resume_from = spec["resume_from"]
    ctx = RecipeContext(
        workdir=workdir,
        dataset_path=workdir / spec["dataset"]["path"],
        dataset_format=dataset_format,
        parameters=parameters,
        seed=spec["seed"],
        output_dir=workdir / spec["output_dir"],
        checkpoint_dir=workdir / spec["checkpoint_dir"],
        checkpoint_every_s=spec["checkpoint_every_s"],
        resume_state=load_checkpoint(workdir / resume_from) if resume_from else None,
        max_runtime_s=spec["max_runtime_s"],
        stop_event=stop,
    )
    if ctx.device == "cpu":
        # On a GPU, bit-exact kernels would cost speed and need CUBLAS_WORKSPACE_CONFIG.
        torch.use_deterministic_algorithms(True)
    result = recipe_cls().train(ctx)
    if result is None:
        if not stop.is_set():
            raise RuntimeError(f"Recipe {recipe_cls.name!r} returned no result unasked.")
        return EXIT_STOPPED
    payload = {
        "metrics": result.metrics,
        "artifacts": result.artifacts,
        "input_signature": result.input_signature,
        "parameters": parameters,
    }
    ctx.emit(format_line("result", payload))
    return EXIT_OK


def _die_with_parent() -> None:
    """Have Linux SIGKILL this process when the thread that started it exits, so that no
    orphan keeps a GPU busy after its worker died."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG) failed with errno {errno}")


def _report(exc: Exception) -> None:
    print(getattr(exc, "detail", str(exc)), file=sys.stderr)
    for field, messages in (getattr(exc, "fields", None) or {}).items():
        for message in messages:
            print(f"  {field}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
