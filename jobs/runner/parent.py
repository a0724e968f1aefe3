"""The worker side of an attempt: prepare inputs, run the child, relay what it says, finish.

The child (`python -m jobs.runner.child`) trains with torch and knows nothing of Django; this
side owns every database and storage write, each fenced by the attempt number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath

import httpx
from django.conf import settings
from django.db import IntegrityError

from jobs.models import Job, JobState, WorkerRuntime
from jobs.recipes.onnx_export import BUNDLE_FILENAME
from jobs.services.attempts import (
    Report,
    StaleAttempt,
    attempt_advertise,
    attempt_bill_running,
    attempt_checkpoint,
    attempt_claim,
    attempt_finish,
    attempt_report,
    attempt_state,
)
from jobs.services.replicas import replica_token
from registry.models import Dataset, DatasetVersion, RegisteredModel
from registry.services import (
    dataset_create,
    dataset_version_create,
    model_version_register,
    registered_model_create,
)
from registry.services.code_packages import code_package_limits
from registry.storage import (
    ObjectMismatch,
    ObjectNotFound,
    StorageError,
    get_storage,
    new_object_key,
)
from tenants.actors import Actor
from tenants.errors import ConflictError

from . import protocol
from .code import (
    JOB_FILE,
    MAX_LOG_LINES,
    MAX_METRICS,
    PREDICT_CHUNK_ROWS,
    ROWS_FILE,
    PackageRefused,
    ReplicaBroken,
    SandboxPredictor,
    WarmSandbox,
    folder_empty,
    gpu_devices,
    package_extract,
    package_line,
    package_sandbox_spec,
    prediction_rows_write,
)
from .evaluate_inputs import evaluation_record, evaluation_stage
from .export_outputs import export_record
from .isolation import (
    ChildFileRefused,
    attempt_folder_create,
    child_file_open,
    child_start,
    child_threads,
)
from .sampler import Sampler
from .sandbox import (
    WORK_FOLDER,
    Limits,
    Runtime,
    SandboxedProcess,
    python_runtime,
    read_lines,
    runtime_refusal,
    sandbox_start,
    sandbox_unavailable_reason,
)
from .warm import warm_child_replace, warm_child_take, warm_sandbox_take

logger = logging.getLogger(__name__)

# A report renews the lease and reads a stop request at least this often; lines go sooner.
REPORT_EVERY_S = 0.5
# A log, metric or progress line is stored within this long of arriving, so a person sees it at
# once; the lines that arrive meanwhile go in the same report, which bounds a chatty child's
# reports to one per this long.
LINES_REPORT_WITHIN_S = 0.02
# The child's task for each kind of job (protocol.TASKS).
TASKS = {
    Job.Kind.TRAIN: "train",
    Job.Kind.INFER: "predict",
    Job.Kind.SERVE: "serve",
    Job.Kind.EVALUATE: "evaluate",
    Job.Kind.EXPORT: "export",
}
MAX_FAILURE_LINES = 20
STOPPED = "Stopped on request."


def stop_process_group(child: subprocess.Popen) -> None:
    """SIGTERM the child's group, then SIGKILL what is left after the grace period."""
    if child.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=settings.JOB_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


class InputMismatch(Exception):
    """A downloaded input is not what the registry recorded; the attempt fails saying which."""


def first_or_create(find, create):
    """The existing row, or a new one; two jobs creating the same name at once both get it."""
    found = find()
    if found is not None:
        return found
    try:
        return create()
    except (ConflictError, IntegrityError):
        return find()


def run_attempt(*, job_id: int, attempt: int, worker_id: int) -> str:
    """Run one attempt to its end; returns what happened (for logs and tests)."""
    job = attempt_claim(job_id=job_id, attempt=attempt, worker_id=worker_id)
    if job is None:
        return "not claimed"  # cancelled, moved to another attempt, or a duplicate message
    warm = _warm_sandbox_take(job) if job.code_package_version_id is not None else None
    workdir = (
        warm.work
        if warm is not None
        else attempt_folder_create(
            root=Path(settings.WORKER_WORKDIR), job_id=job_id, attempt=attempt
        )
    )
    try:
        if job.code_package_version_id is not None:
            return _CodeAttempt(job, attempt, workdir, warm=warm).run()
        return _Attempt(job, attempt, workdir).run()
    except StaleAttempt:
        logger.warning("job %s attempt %s is stale; stopped writing", job_id, attempt)
        return "stale"
    finally:
        if warm is not None:
            warm.discard()  # ends it if it never got the job (its inputs did not arrive)
        shutil.rmtree(workdir, ignore_errors=True)
        warm_child_replace()  # for the next job, now that this one's child is gone


def _warm_sandbox_take(job: Job) -> WarmSandbox | None:
    """The own-code sandbox this process started ahead, when the job fits it (WarmSandbox.fits)."""
    try:
        runtime = _job_runtime(job)
    except RuntimeUnavailable:
        return None  # the attempt fails saying so, without a sandbox
    return warm_sandbox_take(
        lambda sandbox: sandbox.fits(
            runtime=runtime,
            threads=child_threads(job.worker.slots),
            gpus=job.resource_class.name != "cpu",
            serving=job.kind == Job.Kind.SERVE,
        )
    )


def _job_runtime(job: Job) -> Runtime:
    """The interpreter this worker reported for the job's runtime, working. The scheduler placed
    the job here because of that report; a worker restarted since without it refuses the job,
    naming the runtime."""
    interpreter = (
        WorkerRuntime.objects.filter(worker_id=job.worker_id, runtime__name=job.runtime, error="")
        .values_list("interpreter", flat=True)
        .first()
    )
    if interpreter is None:
        raise RuntimeUnavailable(
            f"This worker does not offer the runtime {job.runtime!r} the package needs."
        )
    return python_runtime(interpreter)


class _Attempt:
    def __init__(self, job: Job, attempt: int, workdir: Path):
        self.job, self.attempt, self.workdir = job, attempt, workdir
        self.storage = get_storage()
        self.lines: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.logs: list[tuple[str, str]] = []
        self.metrics: list[dict] = []
        self.progress: dict | None = None
        self.stderr_tail: list[str] = []
        self.result: dict | None = None
        self.serving = job.kind == Job.Kind.SERVE
        # A replica's address once it serves, and when it last answered a health check.
        self.address: str | None = None
        self.answered_at = self.next_health_check = 0.0
        self.sampler: Sampler | None = None

    def run(self) -> str:
        try:
            if not self._through_outage(self._write_spec):
                attempt_finish(
                    job_id=self.job.pk, attempt=self.attempt, outcome="stopped", reason=STOPPED
                )
                return "stopped"
        except Exception as exc:  # inputs could not be fetched: the attempt fails with the reason
            logger.exception("preparing job %s failed", self.job.pk)
            attempt_finish(
                job_id=self.job.pk,
                attempt=self.attempt,
                outcome="failed",
                reason=f"Could not prepare inputs: {exc}",
            )
            return "failed"
        child = self._start()
        try:
            outcome, reason = self._supervise(child)
        except ChildFileRefused as exc:  # a checkpoint that is a link, say: stop reading it
            outcome, reason = "failed", str(exc)
        finally:
            stop_process_group(child)
        if outcome == "succeeded":
            outputs: dict = {}
            try:
                if not self._through_outage(lambda: outputs.update(self._register_outputs())):
                    outcome, reason = "stopped", STOPPED
            except Exception as exc:  # the registry refused the outputs: the job fails, saying why
                logger.exception("registering job %s's outputs failed", self.job.pk)
                attempt_finish(
                    job_id=self.job.pk,
                    attempt=self.attempt,
                    outcome="failed",
                    reason=f"Could not register the outputs: {exc}",
                )
                return "failed"
        if outcome == "succeeded":
            attempt_finish(job_id=self.job.pk, attempt=self.attempt, outcome="succeeded", **outputs)
        else:
            attempt_finish(job_id=self.job.pk, attempt=self.attempt, outcome=outcome, reason=reason)
        return outcome

    def _through_outage(self, step) -> bool:
        """Run `step` (fetching inputs, storing outputs), waiting out a storage outage for up to
        JOB_STORAGE_RETRY_S.

        The attempt keeps reporting meanwhile, so its lease holds; a missing object or any other
        error raises at once. False when the job was cancelled or preempted while waiting.
        """
        deadline = time.monotonic() + settings.JOB_STORAGE_RETRY_S
        delay = 0.5
        while True:
            try:
                step()
                return True
            except ObjectNotFound:
                raise
            except StorageError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("job %s: storage unavailable, retrying: %s", self.job.pk, exc)
                self.logs.append(("stderr", f"Storage unavailable, retrying in {delay:.0f} s."))
                if self._flush() != JobState.RUNNING:
                    return False
                time.sleep(delay)  # waiting out an outage of a real service
                delay = min(delay * 2, 5.0)

    def _download(self, key: str, target: Path) -> None:
        with self.storage.open(key) as source, target.open("wb") as out:
            shutil.copyfileobj(source, out, length=1024 * 1024)

    def _download_input(self, what: str, *, key: str, size: int, sha256: str, target: Path) -> None:
        """Fetch an input the registry recorded, refusing bytes other than those it checked."""
        try:
            self.storage.download_verified(key, target, size=size, sha256=sha256)
        except ObjectMismatch as exc:
            logger.error("job %s: %s at %s does not match its record", self.job.pk, what, key)
            raise InputMismatch(
                f"{what} does not match its recorded {exc.field} (recorded {exc.recorded}, "
                f"downloaded {exc.found}): the stored bytes changed after they were recorded, so "
                "the job did not use them."
            ) from exc

    def _write_spec(self) -> None:
        dataset = self.job.input_dataset_version
        for linked in (dataset, self.job.input_model_version):
            # Admission checked this; a row written another way must still not hand one
            # organization's files to another's job.
            if linked is not None and linked.organization_id != self.job.organization_id:
                raise InputMismatch(f"{linked} belongs to another organization.")
        if dataset is not None:  # a serve job reads none
            dataset_path = self.workdir / f"dataset.{dataset.format}"
            self._download_input(
                f"input dataset {dataset.dataset.name} v{dataset.number}",
                key=dataset.storage_key,
                size=dataset.size_bytes,
                sha256=dataset.sha256,
                target=dataset_path,
            )
        resume_from = None
        if self.job.checkpoint_key:
            # Written by the platform alone and never recorded with a checksum; torch reads it
            # with weights_only=True.
            resume_from = str(self.workdir / "resume.pt")
            self._download(self.job.checkpoint_key, Path(resume_from))
        model_dir = None
        if self.job.input_model_version is not None:
            model_dir = "model"
            (self.workdir / model_dir).mkdir()
            model = self.job.input_model_version
            for artifact in model.artifacts.all():
                self._download_input(
                    f"input model {model.registered_model.name} v{model.number} {artifact.name}",
                    key=artifact.storage_key,
                    size=artifact.size_bytes,
                    sha256=artifact.sha256,
                    target=self.workdir / model_dir / artifact.name,
                )
        (self.workdir / "output").mkdir()
        (self.workdir / "checkpoints").mkdir()
        gpus = self.job.gpu_count if self.job.resource_class.name != "cpu" else 1
        task = TASKS[self.job.kind]
        spec = {
            "task": task,
            "model_dir": model_dir,
            "processes": gpus,
            "recipe": self.job.recipe,
            "parameters": self.job.parameters,
            "resume_from": resume_from,
            "output_dir": "output",
            "checkpoint_dir": "checkpoints",
            "checkpoint_every_s": settings.JOB_CHECKPOINT_EVERY_S,
            "seed": self.job.pk,
            "max_runtime_s": None,  # enforced here, so a timeout is reported as one
        }
        if task == "evaluate":
            spec.update(evaluation_stage(self.job, self.workdir, self._download_input))
        if dataset is not None:
            spec["dataset"] = {
                "path": str(dataset_path),
                "format": dataset.format,
                "csv_dialect": dataset.csv_dialect,
            }
        if self.serving:
            spec["serve"] = self._serve_options()
        protocol.write_spec(self.workdir, spec)

    def _serve_options(self) -> dict:
        return {
            "host": settings.WORKER_SERVE_HOST,
            # Derived for this attempt: the only secret the replica's server gets.
            "token": replica_token(self.job.pk, self.attempt),
            "max_items": settings.ONLINE_PREDICTION_MAX_ROWS,
            "max_body_bytes": settings.SERVE_MAX_BODY_BYTES,
            "drain_s": settings.SERVE_DRAIN_S,
        }

    def _start(self) -> subprocess.Popen:
        threads = child_threads(self.job.worker.slots)
        devices = (
            ",".join(map(str, self.job.slot_indices))
            if self.job.resource_class.name != "cpu"
            else ""
        )
        waiting = warm_child_take(threads=threads, meanwhile=self._flush, every=REPORT_EVERY_S)
        # A child still importing (started cold, or warm and not done) says READY later: it is
        # handed its job from the thread that reads its stdout, while this one supervises (and
        # reports, keeping the attempt's lease) meanwhile.
        if waiting is None:
            child, hand_over = child_start(
                workdir=self.workdir, cuda_visible_devices=devices, threads=threads
            )
        else:
            child, hand_over = waiting.for_job(workdir=self.workdir, cuda_visible_devices=devices)
        threading.Thread(
            target=self._pump, args=("stdout", child.stdout, hand_over), daemon=True
        ).start()
        threading.Thread(target=self._pump, args=("stderr", child.stderr), daemon=True).start()
        return child

    def _pump(self, stream: str, pipe, hand_over=None) -> None:
        try:
            if hand_over is not None:
                hand_over()  # reads the child's READY line
            for line in pipe:
                self.lines.put((stream, line.rstrip("\n")))
        finally:
            self.lines.put(None)

    def _supervise(self, child: subprocess.Popen) -> tuple[str, str]:
        self.sampler = Sampler(
            root_pid=child.pid,
            gpu_indices=self.job.slot_indices if self.job.resource_class.name != "cpu" else [],
            interval=settings.UTILIZATION_SAMPLE_S,
            max_samples=settings.UTILIZATION_MAX_SAMPLES,
        )
        try:
            return self._supervise_sampled(child)
        finally:
            self.sampler.close()

    def _supervise_sampled(self, child: subprocess.Popen) -> tuple[str, str]:
        started = time.monotonic()
        stop_deadline = None
        over_time = unresponsive = False
        open_pipes = 2
        next_report = time.monotonic()
        lines_due = None  # when the lines taken since the last report must be stored
        next_bill = started + settings.SERVE_BILLING_INTERVAL_S
        # A replica answers its requests in flight before it exits; a job only checkpoints.
        grace = settings.JOB_STOP_GRACE_S + (settings.SERVE_DRAIN_S if self.serving else 0)
        while open_pipes or child.poll() is None:
            wait = 0.1 if lines_due is None else max(0.0, lines_due - time.monotonic())
            try:
                item = self.lines.get(timeout=wait)
            except queue.Empty:
                item = False
            if item is None:
                open_pipes -= 1
            elif item:
                self._take(*item)
                if lines_due is None and (self.logs or self.metrics or self.progress):
                    lines_due = time.monotonic() + LINES_REPORT_WITHIN_S
            now = time.monotonic()
            self.sampler.take(now)
            if now >= next_report or (lines_due is not None and now >= lines_due):
                next_report, lines_due = now + REPORT_EVERY_S, None
                state = self._flush()
                if stop_deadline is None and state in (JobState.CANCELLING, JobState.PREEMPTED):
                    self._ask_to_stop(child)
                    stop_deadline = now + grace
                # max_runtime_s 0: no limit (a replica serves until it is stopped).
                if (
                    stop_deadline is None
                    and self.job.max_runtime_s
                    and now - started > self.job.max_runtime_s
                ):
                    over_time = True
                    self._ask_to_stop(child)
                    stop_deadline = now + grace
            if self.serving and now >= next_bill:
                next_bill = now + settings.SERVE_BILLING_INTERVAL_S
                attempt_bill_running(job_id=self.job.pk, attempt=self.attempt)
            if stop_deadline is None and self._unresponsive(now):
                unresponsive = True
                stop_deadline = now  # hung: nothing to drain, killed at once
            if stop_deadline is not None and now > stop_deadline and child.poll() is None:
                self._kill(child)
        self._flush()
        code = child.wait()
        if over_time:
            return "failed", f"Exceeded its maximum runtime of {self.job.max_runtime_s} s."
        if unresponsive:
            return "failed", (
                f"The replica did not answer its health checks for "
                f"{settings.SERVE_UNRESPONSIVE_S:g} s, so it was killed."
            )
        if code == protocol.EXIT_OK and self.result is not None:
            return "succeeded", ""
        if code == protocol.EXIT_STOPPED or stop_deadline is not None:
            return "stopped", STOPPED
        detail = "\n".join(self.stderr_tail[-MAX_FAILURE_LINES:]) or f"exit code {code}"
        if code == protocol.EXIT_BAD_INPUT:
            prefix = "The input or parameters were rejected"
        elif self.serving:
            prefix = "The replica stopped unasked"
        else:
            prefix = "Training failed"
        return "failed", f"{prefix}: {detail}"

    def _ask_to_stop(self, child: subprocess.Popen) -> None:
        """SIGTERM: a job checkpoints and exits, a replica drains and exits."""
        child.send_signal(signal.SIGTERM)

    def _kill(self, child: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)

    def _unresponsive(self, now: float) -> bool:
        """A replica's server answers /healthz, checked a few times per SERVE_UNRESPONSIVE_S:
        True once it has not for that long (hung, or frozen), so that it is killed rather than
        left holding its slot while the web's requests to it time out."""
        if self.address is None or now < self.next_health_check:
            return False
        period = settings.SERVE_UNRESPONSIVE_S
        self.next_health_check = now + max(0.5, period / 6)
        try:
            answered = httpx.get(f"http://{self.address}/healthz", timeout=min(2.0, period / 3))
            if answered.status_code == 200:
                self.answered_at = now
        except httpx.HTTPError:
            pass
        return now - self.answered_at > period

    def _take(self, stream: str, line: str) -> None:
        if stream == "stderr":
            self.stderr_tail = [*self.stderr_tail[-MAX_FAILURE_LINES:], line]
            self.logs.append(("stderr", line))
            return
        kind, payload = protocol.parse_line(line)
        if kind == "metric":
            self.metrics.append(payload)
        elif kind == "progress":
            self.progress = payload
        elif kind == "checkpoint":
            self._checkpoint(payload)
        elif kind == "result":
            self.result = payload
        elif kind == "serving" and self.serving:
            self._advertise(payload["port"])
        elif kind == "log":
            self.logs.append(("stdout", payload))

    def _advertise(self, port: int) -> None:
        """The replica serves on `port`: the web may route to it from now on."""
        host = settings.WORKER_SERVE_HOST
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if attempt_advertise(job_id=self.job.pk, attempt=self.attempt, address=address):
            self.logs.append(("stdout", f"Serving at {address}."))
            self.address, self.answered_at = address, time.monotonic()

    def _flush(self) -> str:
        samples, thin = self.sampler.drain() if self.sampler is not None else ([], False)
        report = Report(
            logs=self.logs,
            metrics=self.metrics,
            progress=self.progress,
            samples=samples,
            thin_samples=thin,
        )
        self.logs, self.metrics, self.progress = [], [], None
        return attempt_report(job_id=self.job.pk, attempt=self.attempt, report=report)

    def _checkpoint(self, payload: dict) -> None:
        key = new_object_key(
            organization_id=self.job.organization_id,
            kind="checkpoints",
            filename=f"job-{self.job.pk}.pt",
        )
        try:
            # Removed once read: the child never deletes its checkpoints.
            with child_file_open(self.workdir, payload["path"], remove=True) as stream:
                self.storage.save(key, stream)
        except StorageError as exc:
            # The job goes on; the next checkpoint tries again (the last stored one still holds).
            logger.warning("job %s: checkpoint not stored: %s", self.job.pk, exc)
            self.logs.append(("stderr", f"Checkpoint at step {payload['step']} not stored: {exc}"))
            return
        try:
            previous = attempt_checkpoint(
                job_id=self.job.pk, attempt=self.attempt, key=key, step=int(payload["step"])
            )
        except StaleAttempt:
            self.storage.delete(key)
            raise
        if previous:
            self.storage.delete(previous)

    def _register_outputs(self) -> dict:
        """The model version (training) or predictions dataset version (inference) the job made."""
        state = attempt_state(job_id=self.job.pk, attempt=self.attempt)
        if state is None:
            raise StaleAttempt(f"job {self.job.pk} attempt {self.attempt}")
        if state == JobState.CANCELLING:
            return {}  # cancelled while finishing: nothing is registered
        # The registry reads its files by path, more than once: it gets copies the job cannot
        # swap for links, in a folder of the worker's own beside the attempt's.
        with tempfile.TemporaryDirectory(
            prefix=f"{self.workdir.name}-outputs-", dir=self.workdir.parent
        ) as folder:
            copies = Path(folder)
            if self.job.kind == Job.Kind.EVALUATE:
                return evaluation_record(self.job, self.result)
            if self.job.kind == Job.Kind.EXPORT:
                bundle = self._artifact_copy(BUNDLE_FILENAME, copies)
                return export_record(self.job, bundle, self.result, self._actor())
            if self.job.kind == Job.Kind.INFER:
                predictions = self._artifact_copy("predictions.csv", copies)
                return {
                    "output_dataset_version_id": self._register_dataset(
                        predictions,
                        filename="predictions.csv",
                        description=f"Predictions of {self.job.input_model_version}.",
                    )
                }
            config = json.loads(self._artifact_copy("config.json", copies).read_text())
            weights = self._artifact_copy("model.safetensors", copies)
            return {"output_model_version_id": self._register_model(weights, config)}

    def _artifact_copy(self, name: str, folder: Path) -> Path:
        """The result artifact `name`, copied out of the attempt's folder into `folder`."""
        target = folder / name
        with (
            child_file_open(self.workdir, self.result["artifacts"][name]) as source,
            target.open("wb") as out,
        ):
            shutil.copyfileobj(source, out, length=1024 * 1024)
        return target

    def _actor(self) -> Actor:
        return Actor(user=self.job.created_by, api_key=self.job.created_by_api_key)

    def _register_dataset(self, path: Path, *, filename: str, description: str) -> int:
        """The job's output as a new version of its output dataset (made with `description` if
        it is the first)."""
        organization, name = self.job.organization, self.job.output_dataset_name
        dataset = first_or_create(
            lambda: Dataset.objects.for_organization(organization).filter(name=name).first(),
            lambda: dataset_create(
                organization=organization,
                name=name,
                description=description,
                actor=self._actor(),
            ),
        )
        version = dataset_version_create(
            dataset=dataset,
            path=path,
            filename=filename,
            actor=self._actor(),
            source=DatasetVersion.Source.JOB_OUTPUT,
            source_job_id=self.job.pk,
            derived_from_model_version=self.job.input_model_version,
            derived_from_dataset_version=self.job.input_dataset_version,
        )
        return version.pk

    def _register_model(self, weights: Path, config: dict) -> int:
        result = self.result
        organization = self.job.organization
        actor = self._actor()
        name = self.job.output_model_name
        registered = first_or_create(
            lambda: (
                RegisteredModel.objects.for_organization(organization).filter(name=name).first()
            ),
            lambda: registered_model_create(organization=organization, name=name, actor=actor),
        )
        version = model_version_register(
            registered_model=registered,
            weights_path=weights,
            config=config,
            actor=actor,
            recipe_name=self.job.recipe,
            recipe_version=self.job.recipe_version,
            parameters=result.get("parameters", self.job.parameters),
            metrics={
                k: v for k, v in result.get("metrics", {}).items() if isinstance(v, int | float)
            },
            input_signature=result.get("input_signature", {}),
            trained_on=[v for v in [self.job.input_dataset_version] if v is not None],
            parent_version=self.job.input_model_version,
            source_job_id=self.job.pk,
        )
        return version.pk


class RuntimeUnavailable(Exception):
    pass


class _CodeAttempt(_Attempt):
    """An attempt that runs a tenant's code package in the sandbox: its train entry for a
    training job, its predict entry for a batch inference job or a replica.

    The same supervision as a recipe's (reports, checkpoints, stop requests, the runtime limit,
    outputs registered by the parent), with these differences: the child is started under
    jobs.runner.sandbox with the package and the in-job library read-only; its lines are read in
    capped pieces (sandbox.read_lines) and checked strictly (code.package_line), a refused one
    failing the attempt; and what is kept of its chatter is capped. A batch job's dataset is
    read by the parent and handed over as JSON rows. A replica's HTTP server is the worker's own
    (jobs.runner.serve in a thread of this attempt), which forwards each request to the package
    over a socket pair (code.SandboxPredictor): the package never listens on a network.
    """

    def __init__(self, job: Job, attempt: int, workdir: Path, *, warm: WarmSandbox | None = None):
        super().__init__(job, attempt, workdir)
        # A sandbox started ahead with `workdir` and its own code folder bound, until its go.
        self.warm = warm
        self.version = job.code_package_version
        self.child: SandboxedProcess | None = None
        self.refused: str | None = None
        self.kept_lines = self.dropped_lines = 0
        self.kept_metrics = 0
        # Beside the work folder, the worker's: the archive (private) and its files (read-only
        # to the sandbox, which sees them at /code).
        self.private = Path(tempfile.mkdtemp(prefix=f"{workdir.name}-archive-", dir=workdir.parent))
        self.code = (
            warm.code
            if warm is not None
            else Path(tempfile.mkdtemp(prefix=f"{workdir.name}-code-", dir=workdir.parent))
        )
        self.task = TASKS[job.kind]
        # A replica's: the server's thread, its stop, and why the package was ended if it was.
        self.server: threading.Thread | None = None
        self.server_stop = threading.Event()
        self.broken: str | None = None

    def run(self) -> str:
        try:
            try:
                reason = sandbox_unavailable_reason() or runtime_refusal(self._runtime())
            except RuntimeUnavailable as exc:
                reason = str(exc)
            if reason is not None:
                attempt_finish(
                    job_id=self.job.pk,
                    attempt=self.attempt,
                    outcome="failed",
                    reason=f"This worker cannot run a code package: {reason}",
                )
                return "failed"
            return super().run()
        finally:
            shutil.rmtree(self.private, ignore_errors=True)
            shutil.rmtree(self.code, ignore_errors=True)

    def _runtime(self) -> Runtime:
        return _job_runtime(self.job)

    def _write_spec(self) -> None:
        job, version = self.job, self.version
        dataset, model = job.input_dataset_version, job.input_model_version
        for linked in (version, dataset, model):
            if linked is not None and linked.organization_id != job.organization_id:
                raise InputMismatch(f"{linked} belongs to another organization.")
        archive = self.private / "package"
        self._download_input(
            f"code package {version}",
            key=version.storage_key,
            size=version.size_bytes,
            sha256=version.sha256,
            target=archive,
        )
        # A retry after an outage starts from an empty folder; emptied, not replaced, since a
        # warm sandbox has this one bound.
        folder_empty(self.code)
        package_extract(archive, self.code, limits=code_package_limits())
        self.code.chmod(0o755)
        inputs_folder = self.workdir / "inputs"
        inputs_folder.mkdir(exist_ok=True)
        inputs = {}
        rows = None
        if dataset is not None:
            name = f"dataset.{dataset.format}"
            # A batch job's package reads the parent's JSON rows, not the file.
            target = (self.private if self.task == "predict" else inputs_folder) / name
            self._download_input(
                f"input dataset {dataset.dataset.name} v{dataset.number}",
                key=dataset.storage_key,
                size=dataset.size_bytes,
                sha256=dataset.sha256,
                target=target,
            )
            if self.task == "predict":
                rows = prediction_rows_write(
                    target,
                    dataset_format=dataset.format,
                    csv_dialect=dataset.csv_dialect,
                    schema=dataset.schema,
                    target=inputs_folder / ROWS_FILE,
                )
                inputs["rows"] = f"{WORK_FOLDER}/inputs/{ROWS_FILE}"
            else:
                inputs["dataset"] = f"{WORK_FOLDER}/inputs/{name}"
        if model is not None:
            (inputs_folder / "model").mkdir(exist_ok=True)
            for artifact in model.artifacts.all():
                self._download_input(
                    f"input model {model.registered_model.name} v{model.number} {artifact.name}",
                    key=artifact.storage_key,
                    size=artifact.size_bytes,
                    sha256=artifact.sha256,
                    target=inputs_folder / "model" / artifact.name,
                )
            inputs["model"] = f"{WORK_FOLDER}/inputs/model"
        resume_from = None
        if job.checkpoint_key:
            resume_from = "resume.pt"
            self._download(job.checkpoint_key, self.workdir / resume_from)
        for folder in ("output", "checkpoints"):
            (self.workdir / folder).mkdir(exist_ok=True)
        description = {
            "task": self.task,
            "entry": version.manifest["entry"]["train" if self.task == "train" else "predict"],
            "parameters": job.parameters,
            "inputs": inputs,
            "work_folder": WORK_FOLDER,
            "checkpoint_dir": "checkpoints",
            "output_dir": "output",
            "resume_from": resume_from,
            "rows": rows,
            "chunk_rows": PREDICT_CHUNK_ROWS,
        }
        (self.workdir / JOB_FILE).write_text(json.dumps(description), encoding="utf-8")

    def _start(self) -> SandboxedProcess:
        job = self.job
        grace = settings.JOB_STOP_GRACE_S
        # The parent's own runtime check (in _supervise) ends an attempt over its maximum with
        # that reason; the sandbox's wall clock is the backstop should the parent miss it.
        wall_clock = job.max_runtime_s + grace + 30 if job.max_runtime_s else 7 * 24 * 3600
        gpus = job.resource_class.name != "cpu"
        limits = Limits(wall_clock_s=wall_clock, stop_grace_s=grace)
        link, inside = socket.socketpair() if self.serving else (None, None)
        if self.warm is not None and not self.warm.alive():
            # Died while the inputs arrived: the job starts cold, in the same folders.
            self.warm.end()
            self.warm = None
        if self.warm is not None:
            child = self.child = self.warm.go(limits=limits)
        else:
            spec = package_sandbox_spec(
                runtime=self._runtime(),
                work_folder=self.workdir,
                code_folder=self.code,
                devices=gpu_devices(job.slot_indices) if gpus else (),
                threads=child_threads(job.worker.slots),
                limits=limits,
                channel_fd=inside.fileno() if inside is not None else None,
            )
            try:
                # Started from the attempt's thread, which outlives it (the sandbox dies with it).
                child = self.child = sandbox_start(spec)
            finally:
                if inside is not None:
                    inside.close()  # the sandbox holds its end; the worker keeps `link`
        for stream, pipe in (("stdout", child.stdout), ("stderr", child.stderr)):
            threading.Thread(target=self._pump, args=(stream, pipe), daemon=True).start()
        if link is not None:
            self.server = threading.Thread(target=self._serve, args=(link,), daemon=True)
            self.server.start()
        return child

    def _serve(self, link: socket.socket) -> None:
        """The replica's server, once the package has loaded its model; on its stop it closes
        the channel, which is the package's stop."""
        from .serve import serve  # uvicorn: only a replica's attempt needs it

        predictor = SandboxPredictor(
            link, timeout_s=settings.SERVE_UNRESPONSIVE_S, on_broken=self._replica_broken
        )
        try:
            predictor.ready()
            serve(
                predictor,
                self._serve_options(),
                self.server_stop,
                on_serving=lambda port: self.lines.put(("serving", str(port))),
            )
        except ReplicaBroken:
            pass  # said by _replica_broken, which ended the sandbox
        finally:
            link.close()

    def _replica_broken(self, reason: str) -> None:
        self.broken = reason
        self.server_stop.set()
        self.child.kill()

    def _ask_to_stop(self, child) -> None:
        if self.serving:
            self.server_stop.set()  # drains, then closes the package's channel
        else:
            child.send_signal(signal.SIGTERM)

    def _pump(self, stream: str, pipe) -> None:
        try:
            for line in read_lines(pipe):
                self.lines.put((stream, line))
        finally:
            self.lines.put(None)

    def _kill(self, child) -> None:
        child.kill()

    def _keep(self, stream: str, line: str) -> None:
        if self.kept_lines >= MAX_LOG_LINES:
            self.dropped_lines += 1
            return
        self.kept_lines += 1
        self.logs.append((stream, line))

    def _take(self, stream: str, line: str) -> None:
        if stream == "serving":  # from the replica's server thread, not the package
            self._advertise(int(line))
            return
        if self.refused is not None:
            return  # nothing a refused package says afterwards is read
        if stream == "stderr":
            self.stderr_tail = [*self.stderr_tail[-MAX_FAILURE_LINES:], line]
            self._keep("stderr", line)
            return
        try:
            kind, payload = package_line(line)
        except PackageRefused as exc:
            self.refused = str(exc)
            self.logs.append(("stderr", self.refused))
            self.child.kill()
            return
        if kind == "metric":
            if self.kept_metrics < MAX_METRICS:
                self.kept_metrics += 1
                self.metrics.append(payload)
        elif kind == "progress":
            self.progress = payload
        elif kind == "checkpoint":
            self._checkpoint(payload)
        elif kind == "result":
            if self.result is not None:
                self.refused = "The package printed a second @@result line; it prints one."
                self.child.kill()
            self.result = payload
        elif kind == "log":
            self._keep("stdout", payload)

    def _supervise(self, child) -> tuple[str, str]:
        try:
            outcome, reason = super()._supervise(child)
        finally:
            if self.server is not None:
                self.server_stop.set()
                self.server.join(timeout=settings.SERVE_DRAIN_S + settings.JOB_STOP_GRACE_S)
        if self.dropped_lines:
            self.logs.append(
                ("stderr", f"{self.dropped_lines} more lines were not kept ({MAX_LOG_LINES} are).")
            )
            self._flush()
        if self.refused is not None:
            return "failed", self.refused
        if self.broken is not None:
            return "failed", f"The replica was ended: {self.broken}"
        ending = child.ending()
        if outcome == "failed" and ending.limit is not None:
            return "failed", f"The sandbox ended the package: {ending.reason}."
        return outcome, reason

    def _register_outputs(self) -> dict:
        state = attempt_state(job_id=self.job.pk, attempt=self.attempt)
        if state is None:
            raise StaleAttempt(f"job {self.job.pk} attempt {self.attempt}")
        if state == JobState.CANCELLING:
            return {}
        artifacts = self.result["artifacts"]
        promised = self.version.manifest["outputs"]
        if self.task == "predict":
            # What the library wrote from the predict entry's outputs; validated like an upload.
            promised = {"model": False, "dataset": True}
            artifacts = {"dataset": artifacts.get("dataset")} if "dataset" in artifacts else {}
        outputs: dict = {}
        with tempfile.TemporaryDirectory(
            prefix=f"{self.workdir.name}-outputs-", dir=self.workdir.parent
        ) as folder:
            copies = Path(folder)
            if "model.safetensors" in artifacts:
                if "config.json" not in artifacts:
                    raise PackageRefused("The package registered weights without a config.json.")
                config = json.loads(self._artifact_copy("config.json", copies).read_text())
                if not isinstance(config, dict):
                    raise PackageRefused("The package's config.json is not a JSON object.")
                weights = self._artifact_copy("model.safetensors", copies)
                outputs["output_model_version_id"] = self._register_model(weights, config)
            elif promised["model"]:
                raise PackageRefused(
                    "The package's manifest promises a model (outputs.model), but its train "
                    "entry registered none (factory_job.register_model)."
                )
            if "dataset" in artifacts:
                copy = self._artifact_copy("dataset", copies)
                outputs["output_dataset_version_id"] = self._register_dataset(
                    copy,
                    filename=PurePosixPath(artifacts["dataset"]).name,
                    description=(
                        f"Predictions of {self.job.input_model_version} by {self.version}."
                        if self.task == "predict"
                        else f"Made by {self.version}."
                    ),
                )
            elif promised["dataset"]:
                raise PackageRefused(
                    "The package's manifest promises a dataset (outputs.dataset), but its train "
                    "entry registered none (factory_job.register_dataset)."
                )
        return outputs
