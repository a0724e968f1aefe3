"""The job's child process, `python -m jobs.runner.child [--warm] [<workdir>]`: trains one recipe on
the files in the working directory, fine-tunes a model, or predicts with one (spec `task`). The
worker hands it the directory on stdin once it is private (jobs.runner.isolation); with --warm it
first imports what a job needs, started ahead of its job (jobs.runner.warm). It runs one job.

It talks to its parent, the GPU worker, only through stdout lines, stderr and files (see
jobs.runner.protocol); no Django, no database, no network. Exit codes are protocol.EXIT_*.

With spec `processes` > 1 it is a supervisor: it hosts the ranks' rendezvous and spawns one
process per rank (multiprocessing "spawn", this module's `_rank_main`), passes SIGTERM on to them
through a shared event, and exits with their outcome. The ranks read spec.json themselves, so
nothing but the working directory's path and the rendezvous port is pickled to them.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobs.recipes.base import (
    Recipe,
    RecipeContext,
    RecipeInputError,
    load_checkpoint,
    validate_parameters,
)
from jobs.recipes.catalog import get_recipe, list_recipes
from jobs.runner.isolation import attempt_enter, die_with_parent, keep_private
from jobs.runner.protocol import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    SpecError,
    read_spec,
)
from registry.formats.csv_reader import CsvDialect
from tenants.errors import DomainError

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Array
    from multiprocessing.synchronize import Event as SharedEvent

# What a warm child imports before its job, beyond the recipes: torch, what
# torch.use_deterministic_algorithms (and the first optimizer) import on first use (seconds more
# than torch alone: docs/benchmarks.md) and the weights' writer, in the zygote it is forked from
# (jobs.runner.zygote); then the tabular readers, in the child, since pyarrow starts a thread
# (jemalloc's) that would keep the zygote from forking safely.
ZYGOTE_IMPORTS = ("torch._inductor.config", "safetensors.torch")
WARM_IMPORTS = ("pyarrow.csv", "pyarrow.compute")
_zygote_warm = False
# Once a rank fails, the others are stuck in a collective: they get this long to report their
# own error before they are killed.
RANK_FAILURE_GRACE_S = 5.0
NOT_FINISHED = -1000  # a rank's slot in the supervisor's `finished` until its task returns


def main(argv: list[str] | None = None) -> int:
    stop = threading.Event()
    # Installed before the slow imports, so that an early SIGTERM still ends in EXIT_STOPPED.
    # The handler only raises the flag: the recipe checkpoints and returns at its next step.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    return _guarded(lambda: _run(prepare(argv), stop))


def prepare(argv: list[str] | None = None) -> Path:
    """The child's first steps, before it reads any tenant data: private to the other processes
    of its user, dying with its parent, in its working directory, which it returns. (The isolation
    test runs its hostile code from here, in the environment a recipe gets.)"""
    keep_private()
    die_with_parent()
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(prog="python -m jobs.runner.child", description=__doc__)
    parser.add_argument(
        "workdir",
        type=Path,
        nargs="?",
        help="the directory holding spec.json; the worker leaves it out and hands the directory "
        "over on stdin once the child is private (jobs.runner.isolation)",
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="import torch and the recipes before saying READY: the worker starts such a child "
        "before its job, so that the job does not wait for them (jobs.runner.warm)",
    )
    arguments = parser.parse_args(argv)
    if arguments.workdir is not None:
        return arguments.workdir.resolve()
    if arguments.warm:
        warm_up()
    return attempt_enter().resolve()


def zygote_warm_up() -> None:
    """What the zygote imports before it forks warm children: the platform's own code, holding
    nothing of a tenant's. Nothing here starts CUDA, whose GPUs the job names (attempt_enter),
    or a thread."""
    global _zygote_warm
    for module in ZYGOTE_IMPORTS:
        importlib.import_module(module)
    list_recipes()
    _zygote_warm = True


def warm_up() -> None:
    """Import what every job imports, the zygote's part once (a forked child has it), and take
    this child's share of the cores: a zygote imports torch with one thread (torch would start
    the others at import, and a process with two threads cannot fork safely), and puts the
    child's count in its environment."""
    if not _zygote_warm:
        zygote_warm_up()
    for module in WARM_IMPORTS:
        importlib.import_module(module)
    torch = sys.modules["torch"]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))


def _guarded(run: Callable[[], int], *, report_input_errors: bool = True) -> int:
    """run()'s exit code, or the code for the exception it raised, with the reason on stderr."""
    try:
        return run()
    except (DomainError, RecipeInputError) as exc:
        if report_input_errors:
            _report(exc)
        return EXIT_BAD_INPUT
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAILED
    except Exception:
        traceback.print_exc()
        return EXIT_FAILED


def _run(workdir: Path, stop: threading.Event) -> int:
    spec, recipe_cls, parameters = _checked_request(workdir)
    if spec["task"] == "serve":
        return _serve(workdir, spec, recipe_cls, stop)
    if spec["task"] == "export":
        from jobs.runner.export import export_run

        return export_run(workdir, spec)
    if spec["processes"] > 1 and spec["task"] == "train":
        return _supervise_ranks(workdir, spec["processes"], stop)
    return _execute(workdir, spec, recipe_cls, parameters, stop)


def _checked_request(workdir: Path) -> tuple[dict[str, Any], type[Recipe], dict[str, Any]]:
    """The spec, the recipe and the resolved parameters, after the checks that need no torch."""
    spec = read_spec(workdir)
    recipe_cls = get_recipe(spec["recipe"])
    if spec["task"] == "serve":
        if not recipe_cls.online:
            raise RecipeInputError(f"Recipe {recipe_cls.name!r} does not serve online.")
        return spec, recipe_cls, {}
    if spec["task"] == "export":
        return spec, recipe_cls, {}
    parameters = validate_parameters(recipe_cls, spec["parameters"], task=spec["task"])
    dataset_format = spec["dataset"]["format"]
    if dataset_format not in recipe_cls.dataset_formats:
        raise RecipeInputError(
            f"Recipe {recipe_cls.name!r} trains on {', '.join(recipe_cls.dataset_formats)} "
            f"datasets, not {dataset_format}."
        )
    if spec["task"] == "train" and spec["processes"] > 1 and not recipe_cls.distributed:
        raise RecipeInputError(
            f"Recipe {recipe_cls.name!r} trains on one device; ask for 1 GPU, "
            f"not {spec['processes']}."
        )
    return spec, recipe_cls, parameters


def _execute(
    workdir: Path,
    spec: dict[str, Any],
    recipe_cls: type[Recipe],
    parameters: dict[str, Any],
    stop: threading.Event,
    **placement: Any,
) -> int:
    """Run the task in this process, as the only one or as one rank (`placement`: rank,
    world_size, devices and emit for RecipeContext); print @@result on success."""
    # torch loads only once the cheap checks passed: a bad request fails in milliseconds.
    import torch

    torch.manual_seed(spec["seed"])
    resume_from = spec["resume_from"]
    model_dir = spec["model_dir"]
    ctx = RecipeContext(
        workdir=workdir,
        dataset_path=workdir / spec["dataset"]["path"],
        dataset_format=spec["dataset"]["format"],
        parameters=parameters,
        seed=spec["seed"],
        output_dir=workdir / spec["output_dir"],
        checkpoint_dir=workdir / spec["checkpoint_dir"],
        checkpoint_every_s=spec["checkpoint_every_s"],
        resume_state=load_checkpoint(workdir / resume_from) if resume_from else None,
        max_runtime_s=spec["max_runtime_s"],
        model_dir=workdir / model_dir if model_dir else None,
        stop_event=stop,
        chunk_rows=spec["chunk_rows"],
        csv_dialect=_csv_dialect(spec["dataset"].get("csv_dialect")),
        **placement,
    )
    if ctx.device == "cpu":
        # On a GPU, bit-exact kernels would cost speed and need CUBLAS_WORKSPACE_CONFIG.
        torch.use_deterministic_algorithms(True)
    recipe = recipe_cls()
    if spec["task"] == "evaluate":
        from jobs.runner.evaluate import evaluation_run

        ctx.lines.line("result", evaluation_run(ctx, recipe, spec["evaluate"]))
        return EXIT_OK
    if spec["task"] == "predict":
        if spec["processes"] > 1:
            ctx.log("Predicting in one process: batch inference does not split across devices.")
        result = recipe.predict(ctx)
    else:
        result = recipe.train(ctx)
    if result is None:
        if not stop.is_set():
            raise RuntimeError(f"Recipe {recipe_cls.name!r} returned no result unasked.")
        return EXIT_STOPPED
    ctx.lines.result(
        metrics=result.metrics,
        artifacts=result.artifacts,
        input_signature=result.input_signature,
        parameters=parameters if result.parameters is None else result.parameters,
    )
    return EXIT_OK


def _serve(
    workdir: Path, spec: dict[str, Any], recipe_cls: type[Recipe], stop: threading.Event
) -> int:
    """Load the model once, then answer HTTP until SIGTERM (jobs.runner.serve)."""
    import torch

    from jobs.runner.serve import serve

    device = "cuda" if torch.cuda.is_available() else "cpu"
    predictor = recipe_cls.online_predictor(workdir / spec["model_dir"], device)
    if stop.is_set():  # stopped while loading: nothing was served, nothing to drain
        return EXIT_STOPPED
    return serve(predictor, spec["serve"], stop)


def _csv_dialect(stored: dict[str, Any] | None) -> CsvDialect | None:
    """The dialect the registry stored for the CSV; None for a version recorded before it was,
    which the reader then detects as the upload did."""
    return None if stored is None else CsvDialect.from_json(stored)


def _supervise_ranks(workdir: Path, world_size: int, stop: threading.Event) -> int:
    """Run `world_size` ranks to their end; the exit code is rank 0's, unless one failed."""
    import torch

    from jobs.recipes.distributed import host_rendezvous

    if torch.cuda.is_available() and torch.cuda.device_count() < world_size:
        raise SpecError(
            f"processes is {world_size} but only {torch.cuda.device_count()} GPUs are visible."
        )
    rendezvous = host_rendezvous()
    context = multiprocessing.get_context("spawn")
    shared_stop = context.Event()
    # Each rank's task's exit code, written before it leaves the process group.
    finished = context.Array("i", [NOT_FINISHED] * world_size, lock=False)
    ranks = [
        context.Process(
            target=_rank_main,
            args=(rank, world_size, rendezvous.port, workdir, shared_stop, finished),
            name=f"rank-{rank}",
        )
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    outcomes: dict[int, int] = {}
    failure: tuple[int, int] | None = None  # (rank, outcome) of the first rank to fail
    failed_at = None
    running = list(ranks)
    while running:
        wait([process.sentinel for process in running], timeout=0.1)
        if stop.is_set():
            shared_stop.set()
        for process in [process for process in running if process.exitcode is not None]:
            running.remove(process)
            rank = ranks.index(process)
            outcomes[rank] = _rank_outcome(rank, process.exitcode, finished[rank])
            if failure is None and outcomes[rank] not in (EXIT_OK, EXIT_STOPPED):
                failure = (rank, outcomes[rank])
                failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > RANK_FAILURE_GRACE_S:
            for process in running:
                process.kill()
    if failure is None:
        return outcomes[0]
    rank, code = failure
    if code < 0:
        print(f"Rank {rank} was killed by signal {-code}.", file=sys.stderr)
        return EXIT_FAILED
    return code


def _rank_outcome(rank: int, exitcode: int, finished: int) -> int:
    """A rank's outcome: how its process ended, unless its task had returned (`finished`).
    Then the task's code stands, since the work is done and every rank agreed on it: leaving
    the process group and the interpreter can still crash (gloo has aborted a rank there)."""
    if finished == NOT_FINISHED:
        return exitcode
    if exitcode != finished:
        how = f"signal {-exitcode}" if exitcode < 0 else f"exit code {exitcode}"
        print(f"Rank {rank} ended with {how} after its task returned {finished}.", file=sys.stderr)
    return finished


def _rank_main(
    rank: int, world_size: int, port: int, workdir: Path, stop: SharedEvent, finished: Array
) -> None:
    """One rank's process: join the group, run the task, exit with its code. Only rank 0
    prints lines and reports a bad request; the others report only their own failures."""
    keep_private()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    die_with_parent()
    # Should a rank abort in native code, its Python stack goes to stderr with the reason.
    faulthandler.enable()
    sys.stdout.reconfigure(line_buffering=True)
    sys.exit(
        _guarded(
            lambda: _run_rank(rank, world_size, port, workdir, stop, finished),
            report_input_errors=rank == 0,
        )
    )


def _run_rank(
    rank: int, world_size: int, port: int, workdir: Path, stop: SharedEvent, finished: Array
) -> int:
    import torch

    from jobs.recipes import distributed

    spec, recipe_cls, parameters = _checked_request(workdir)
    device = distributed.init(rank, world_size, port)
    try:
        if device == "cpu":
            # The parent sized the thread pool for the whole job; the ranks share it.
            torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
        placement: dict[str, Any] = {"rank": rank, "world_size": world_size, "devices": [device]}
        if not distributed.is_main():
            placement["emit"] = _silent
        try:
            code = _execute(workdir, spec, recipe_cls, parameters, stop, **placement)
        except (DomainError, RecipeInputError):
            raise
        except Exception:
            if rank:
                print(f"Rank {rank} failed:", file=sys.stderr)
            raise
        finished[rank] = code
        return code
    finally:
        distributed.teardown(finished=finished[rank] != NOT_FINISHED)


def _silent(_line: str) -> None:
    """The lines of ranks other than 0: rank 0 says the same for all of them."""


def _report(exc: Exception) -> None:
    print(getattr(exc, "detail", str(exc)), file=sys.stderr)
    for field, messages in (getattr(exc, "fields", None) or {}).items():
        for message in messages:
            print(f"  {field}: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
