"""Submit -> first step of an own-code package job, in a sandbox started ahead (warm) against one
started with the job (cold), in the same run on the same worker.

Starts the pool as bench/e2e.py does (beat, a default-queue worker, one CPU worker with one
slot; database `factory_saas_codebench` created afresh, Redis db 8 flushed; both overridable
with BENCH_CODE_DATABASE_URL / BENCH_CODE_REDIS_URL). The worker offers one interpreter under
two runtime names: the first, its default, is the one it starts sandboxes ahead for; the
second names the same interpreter by its real path, so its jobs start their sandbox cold and
differ in nothing else. The runs alternate between the two packages (the same code, each
manifest naming one runtime), one job at a time, after a warm-up job of each.

    .venv/bin/python -m bench.code_start              # 15 runs of each; ~2 minutes
    .venv/bin/python -m bench.code_start --quick      # 3 of each

The package is standard-library only: the sandbox's user cannot read this VM's torch (under
/root), so the runtime is the system's Python, and the warm sandbox's ahead-imports (numpy,
torch) find nothing to import. Its first lines are step 1's @@progress and @@metric.

Figures, from just before `code_job_submit`: `first step` = the step-1 metric row's created_at
(stored within LINES_REPORT_WITHIN_S of arriving); `started -> first step` = from the attempt's
`started` event, the part the sandbox is on. Medians and p90 per side; `RESULT {json}` last.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.e2e import (
    POLL_S,
    REPO_ROOT,
    SETTINGS_MODULE,
    TIMINGS,
    WORKER_NAME,
    Pool,
    _after,
    django_fresh,
    percentile,
    progress,
)

DATABASE_URL = os.environ.get(
    "BENCH_CODE_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/factory_saas_codebench"
)
REDIS_URL = os.environ.get("BENCH_CODE_REDIS_URL", "redis://127.0.0.1:6379/8")
INTERPRETER = "/usr/bin/python3"
WARM_RUNTIME, COLD_RUNTIME = "py-warm", "py-cold"
SANDBOX_UID = 65534
MANIFEST = """
[package]
name = "{name}"
[entry]
train = "trainer:run"
[runtime]
name = "{runtime}"
[outputs]
model = true
"""
TRAINER = """
import json, struct
import factory_job

def run():
    steps = factory_job.params().get("steps", 3)
    for step in range(1, steps + 1):
        factory_job.progress(step, steps)
        factory_job.log(step=step, loss=1.0 / step)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path = factory_job.checkpoint_dir().parent / "output" / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.0))
    factory_job.register_model(path, {"steps": steps})
"""
TIMEOUT_S = 120
# For the sandbox-level measure with torch: the entry imports torch and takes one step.
TORCH_TRAINER = """
def run():
    import torch
    torch.set_num_threads(1)
    model = torch.nn.Linear(64, 10)
    torch.nn.functional.cross_entropy(model(torch.randn(32, 64)), torch.zeros(32).long()).backward()
    print("first-step", flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="jobs of each side")
    parser.add_argument("--quick", action="store_true", help="3 jobs of each side")
    args = parser.parse_args()
    runs = 3 if args.quick else args.runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    run(runs=runs)


def run(*, runs: int) -> None:

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="code-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # The work root as the image lays it out: the sandbox's user passes, nobody lists.
        tmp.chmod(0o755)
        work = tmp / "work"
        work.mkdir(mode=0o1733)
        work.chmod(0o1733)
        if os.geteuid() == 0:
            os.chown(work, SANDBOX_UID, SANDBOX_UID)
        cold_path = os.path.realpath(INTERPRETER)
        if cold_path == INTERPRETER:
            cold_path = os.path.join(os.path.dirname(cold_path), ".", os.path.basename(cold_path))
        env = {
            **os.environ,
            **TIMINGS,
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "DATABASE_URL": DATABASE_URL,
            "REDIS_URL": REDIS_URL,
            "CELERY_BROKER_URL": REDIS_URL,
            "STORAGE_BACKEND": "local",
            "STORAGE_LOCAL_ROOT": str(tmp / "storage"),
            "WORKER_WORKDIR": str(work),
            "WORKER_RUNTIMES": f"{WARM_RUNTIME}={INTERPRETER},{COLD_RUNTIME}={cold_path}",
        }
        django_fresh(env, database_url=DATABASE_URL, redis_url=REDIS_URL)
        tenant = _tenant(tmp)
        pool = Pool(tmp, env)
        try:
            progress("starting beat, the default-queue worker and the CPU worker")
            pool.start()
            for side in (WARM_RUNTIME, COLD_RUNTIME):
                _measure(pool, tenant, side)  # warm-up
            timed: dict[str, list[tuple[float, float]]] = {WARM_RUNTIME: [], COLD_RUNTIME: []}
            for number in range(runs):
                order = (
                    (WARM_RUNTIME, COLD_RUNTIME)
                    if number % 2 == 0
                    else (COLD_RUNTIME, WARM_RUNTIME)
                )
                for side in order:
                    timed[side].append(_measure(pool, tenant, side))
                    progress(f"run {number + 1}/{runs} {side}: {timed[side][-1][0]:.3f} s")
        except BaseException:
            progress(pool.logs())
            raise
        finally:
            pool.stop()
    progress("the sandbox alone, with torch")
    with_torch = measure_torch_start(rounds=max(3, runs // 2))
    _report(timed, with_torch, runs=runs, load=(load_before, os.getloadavg()))


def measure_torch_start(*, rounds: int) -> dict[str, list[float]]:
    """Seconds from the job's files being written to the package's `first-step` line, for a
    package that imports torch: in a sandbox started ahead (its ahead-imports done) against one
    started for it. No platform: the runtime is bench.sandbox's (the system's Python with this
    environment's site-packages read-only), which the worker's WORKER_RUNTIMES cannot name."""
    from bench.sandbox import _runtime
    from jobs.runner.code import JOB_FILE, WarmSandbox, package_sandbox_spec
    from jobs.runner.isolation import staging_folder_create
    from jobs.runner.sandbox import Limits, read_lines, sandbox_start

    runtime, _ = _runtime()
    root = Path(tempfile.mkdtemp(prefix="code-bench-torch-", dir="/tmp"))
    root.chmod(0o755)
    work_root = root / "work"
    work_root.mkdir(mode=0o1733)
    work_root.chmod(0o1733)
    if os.geteuid() == 0:
        os.chown(work_root, SANDBOX_UID, SANDBOX_UID)
    limits = Limits(wall_clock_s=600)
    took: dict[str, list[float]] = {"warm": [], "cold": []}
    try:
        for number in range(rounds):
            for side in ("warm", "cold") if number % 2 == 0 else ("cold", "warm"):
                if side == "warm":
                    sandbox = WarmSandbox(runtime=runtime, root=work_root, threads=1)
                    _until_torch_imported(sandbox.process)
                    began = time.perf_counter()
                    _job_files(sandbox.work, sandbox.code, JOB_FILE)
                    process = sandbox.go(limits=limits)
                    work, code = sandbox.work, sandbox.code
                else:
                    work = staging_folder_create(root=work_root)
                    code = Path(tempfile.mkdtemp(dir=work_root))
                    code.chmod(0o755)
                    began = time.perf_counter()
                    _job_files(work, code, JOB_FILE)
                    process = sandbox_start(
                        package_sandbox_spec(
                            runtime=runtime,
                            work_folder=work,
                            code_folder=code,
                            devices=(),
                            threads=1,
                            limits=limits,
                        )
                    )
                lines = read_lines(process.stdout)
                if next((line for line in lines if line == "first-step"), None) is None:
                    raise SystemExit(f"{side}: no first step: {process.stderr.read()[-2000:]}")
                took[side].append(time.perf_counter() - began)
                for _line in lines:
                    pass
                process.wait()
                process.stdout.close()
                process.stderr.close()
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(code, ignore_errors=True)
                progress(f"with torch {number + 1}/{rounds} {side}: {took[side][-1]:.3f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return took


def _until_torch_imported(process) -> None:
    """Wait until the waiting child has torch loaded (its shared library mapped) and sleeps."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for pid in process.processes()[1:]:
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
                if state == "S" and "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text():
                    return
        if process.poll() is not None:
            raise SystemExit(f"the warm sandbox ended: {process.stderr.read()[-2000:]}")
        time.sleep(POLL_S)
    raise SystemExit(f"the warm sandbox did not import torch in {TIMEOUT_S} s")


def _job_files(work: Path, code: Path, job_file: str) -> None:
    """What the parent writes for a job: the package's file, the folders and the job file."""
    (code / "trainer.py").write_text(TORCH_TRAINER)
    (code / "trainer.py").chmod(0o644)
    for folder in ("output", "checkpoints"):
        (work / folder).mkdir()
    description = {
        "task": "train",
        "entry": "trainer:run",
        "parameters": {},
        "inputs": {},
        "work_folder": "/job",
        "checkpoint_dir": "checkpoints",
        "output_dir": "output",
        "resume_from": None,
        "rows": None,
        "chunk_rows": 256,
    }
    (work / job_file).write_text(json.dumps(description))


def _tenant(tmp: Path) -> dict:
    from jobs.models import ResourceClass
    from registry.services.code_packages import code_package_version_create
    from tenants.actors import Actor
    from tenants.models import User
    from tenants.services import organization_create

    user = User.objects.create_user(email="code-bench@example.com")
    actor = Actor(user=user)
    organization = organization_create(name="Code bench", owner=user, actor=actor)
    versions = {}
    for runtime in (WARM_RUNTIME, COLD_RUNTIME):
        path = tmp / f"{runtime}.tar.gz"
        name = f"bench-{runtime}"
        path.write_bytes(
            _archive(
                {
                    "factory.toml": MANIFEST.format(name=name, runtime=runtime),
                    "trainer.py": TRAINER,
                }
            )
        )
        versions[runtime] = code_package_version_create(
            organization=organization, path=path, filename=path.name, actor=actor
        )
    return {
        "organization": organization,
        "actor": actor,
        "versions": versions,
        "cpu": ResourceClass.objects.get(name="cpu"),
    }


def _archive(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as bundle:
        for path, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            bundle.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _measure(pool: Pool, tenant: dict, runtime: str) -> tuple[float, float]:
    """(submit -> step-1 metric stored, started -> step-1 metric stored), seconds."""
    from jobs.models import TERMINAL_STATES, Job, JobEvent, JobMetric
    from jobs.services import JobOptions
    from jobs.services.submission import code_job_submit

    began = time.time()
    job, _ = code_job_submit(
        organization=tenant["organization"],
        actor=tenant["actor"],
        code_package_version=tenant["versions"][runtime],
        parameters={},
        options=JobOptions(resource_class=tenant["cpu"], max_runtime_s=600),
    )
    deadline = time.monotonic() + TIMEOUT_S
    while (
        first := JobMetric.objects.filter(job_id=job.pk, step=1)
        .values_list("created_at", flat=True)
        .first()
    ) is None:
        state, reason = Job.objects.values_list("state", "failure_reason").get(pk=job.pk)
        pool.check_alive()
        if state in TERMINAL_STATES:
            raise SystemExit(f"job {job.pk} ({runtime}) {state} before its first step: {reason}")
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job.pk} ({runtime}): no first step after {TIMEOUT_S} s")
        time.sleep(POLL_S)
    pool.wait_finished(job)
    started = JobEvent.objects.get(job_id=job.pk, kind="started").created_at
    return _after(first, began), (first - started).total_seconds()


def _report(timed: dict, with_torch: dict, *, runs: int, load) -> None:
    def stats(values: list[float]) -> str:
        return f"p50 {statistics.median(values):6.3f} s   p90 {percentile(values, 0.9):6.3f} s"

    print(
        f"Own-code package job, submit -> first step: worker {WORKER_NAME} (1 CPU slot), "
        f"{runs} jobs per side, interleaved; {os.cpu_count()} CPUs; load average "
        f"{load[0][0]:.2f} before, {load[1][0]:.2f} after"
    )
    for side, label in ((WARM_RUNTIME, "warm sandbox"), (COLD_RUNTIME, "cold sandbox")):
        print(f"  {label}  submit -> first step     {stats([t[0] for t in timed[side]])}")
        print(f"  {label}  started -> first step    {stats([t[1] for t in timed[side]])}")
    print(
        f"  the sandbox alone, a package importing torch, {len(with_torch['warm'])} rounds: "
        "job files written -> first step"
    )
    for side in ("warm", "cold"):
        print(f"  {side} sandbox  files -> first step     {stats(with_torch[side])}")
    result = {
        "code_submit_to_first_step_p50_s": round(
            statistics.median(t[0] for t in timed[WARM_RUNTIME]), 3
        ),
        "code_submit_to_first_step_cold_p50_s": round(
            statistics.median(t[0] for t in timed[COLD_RUNTIME]), 3
        ),
        "code_started_to_first_step_p50_s": round(
            statistics.median(t[1] for t in timed[WARM_RUNTIME]), 3
        ),
        "code_started_to_first_step_cold_p50_s": round(
            statistics.median(t[1] for t in timed[COLD_RUNTIME]), 3
        ),
        "runs": runs,
        "code_torch_files_to_first_step_p50_s": round(statistics.median(with_torch["warm"]), 3),
        "code_torch_files_to_first_step_cold_p50_s": round(
            statistics.median(with_torch["cold"]), 3
        ),
    }
    print(f"RESULT {json.dumps(result)}")


if __name__ == "__main__":
    main()
