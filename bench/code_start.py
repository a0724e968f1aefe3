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
import io
import json
import os
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
    flush_redis,
    percentile,
    progress,
    recreate_database,
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
    from bench.databases import migrate

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
        progress(f"recreating {DATABASE_URL} and flushing {REDIS_URL}")
        recreate_database(DATABASE_URL)
        migrate(env)
        flush_redis(REDIS_URL)
        os.environ.update(env)
        import django

        django.setup()
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
    _report(timed, runs=runs, load=(load_before, os.getloadavg()))


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


def _report(timed: dict, *, runs: int, load) -> None:
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
    }
    print(f"RESULT {json.dumps(result)}")


if __name__ == "__main__":
    main()
