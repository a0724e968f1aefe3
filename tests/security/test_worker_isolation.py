"""A job's child, acting as hostile tenant code would, finds no secret and no other tenant's files.

The child runs as the worker's own user (the sandbox that gives it its own comes later), so this
is defence in depth: the worker's process cannot be read through /proc, the child's environment
and its own folder hold no secret, and another attempt's folder can be neither listed, guessed,
nor found through /proc.

The scene is the production worker's: a worker process holding the platform's secrets in its
environment starts two children with the parent's own functions, the victim (a real recipe
child training on tenant A's data) and the attacker (tenant B's code, run after the child's own
`prepare`, in the environment a recipe gets). As root, the worker runs without capabilities, as
an ordinary user would, and the work root belongs to another user, as the image lays it out.

The other way round, the worker (the trusted parent) reads the files a child names, checkpoints
and result artifacts, as itself: a child that names a link, to the worker's own environment or
to another tenant's stored object, fails its attempt, and nothing it pointed at is stored.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from jobs.models import Job, JobState
from jobs.runner import parent
from jobs.runner.isolation import ChildFileRefused, child_file_open, child_start
from jobs.runner.parent import run_attempt
from jobs.runner.protocol import EXIT_OK, EXIT_STOPPED, format_line
from jobs.scheduler.apply import scheduler_pass
from jobs.services.pool import worker_register
from registry.services import (
    dataset_create,
    dataset_version_create,
    model_version_register,
    registered_model_create,
)
from tenants.actors import Actor
from tests.factories import JobFactory
from tests.jobs.test_pool_e2e import _separable_csv
from tests.pool import Pool
from tests.processes import alive, descendants, wait_for

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
PR_CAPBSET_DROP = 24

SECRETS = {
    "DATABASE_URL": "postgres://factory:db-password-7f3a@db:5432/factory",
    "SECRET_KEY": "django-secret-key-9c41e0",
    "REDIS_URL": "redis://:redis-password-51bd@redis:6379/0",
    "CELERY_BROKER_URL": "redis://:broker-password-02ce@redis:6379/0",
    "S3_SECRET_ACCESS_KEY": "s3-secret-access-key-6e2f",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key-d8a0",
    "STRIPE_SECRET_KEY": "sk_live_stripe-secret-44b1",
    "STRIPE_WEBHOOK_SECRET": "whsec_webhook-secret-3a9e",
}
# A column of tenant A's dataset: it must not reach tenant B.
VICTIM_MARKER = "acme_private_margin"

ATTACK = r"""
import json, os
from pathlib import Path

from jobs.runner.child import prepare

own = prepare([])
root = own.parent
report = {"environ": dict(os.environ)}


def attempt(name, action):
    try:
        report[name] = ["read", repr(action())[:4000]]
    except OSError as exc:
        report[name] = ["refused", type(exc).__name__]


def contents(folder):
    return [p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()]


parent = os.getppid()
attempt("parent environ", lambda: Path(f"/proc/{parent}/environ").read_bytes())
attempt("parent memory", lambda: open(f"/proc/{parent}/mem", "rb").close())
attempt(
    "parent open files",
    lambda: [os.readlink(f"/proc/{parent}/fd/{fd}") for fd in os.listdir(f"/proc/{parent}/fd")],
)
attempt("work root listing", lambda: os.listdir(root))
attempt("home", lambda: contents(Path(os.environ.get("HOME", "/nonexistent"))))
attempt("own folder", lambda: contents(own))

# Other attempts' folders: named as the worker names them, or seen in /proc.
leads = {root / f"job-{job}-attempt-{n}" for job in range(1, 10) for n in range(1, 4)}
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue
    for source in ("cwd", "cmdline", "environ"):
        try:
            if source == "cwd":
                seen = os.readlink(f"/proc/{pid}/cwd")
            else:
                seen = Path(f"/proc/{pid}/{source}").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for token in seen.replace("\0", " ").replace("=", " ").split():
            if token.startswith(f"{root}/"):
                leads.add(Path(*Path(token).parts[: len(root.parts) + 1]))
leads.discard(own)
report["leads"] = sorted(map(str, leads))
for folder in sorted(leads):
    if folder.exists():
        attempt(f"list {folder.name}", lambda f=folder: os.listdir(f))
        attempt(f"read {folder.name}", lambda f=folder: contents(f))
print(json.dumps(report))
"""

WORKER = r"""
import json, os, signal, sys
from pathlib import Path

from jobs.runner.isolation import attempt_folder_create, child_start
from jobs.runner.protocol import write_spec

root = Path(sys.argv[1])
marker = sys.argv[2]
attack = sys.argv[3]

victim_dir = attempt_folder_create(root=root, job_id=1, attempt=1)
rows = [f"x1,{marker},label"]
rows += [f"{i / 100},{i % 7},{'yes' if i % 2 else 'no'}" for i in range(200)]
(victim_dir / "data.csv").write_text("\n".join(rows) + "\n")
write_spec(
    victim_dir,
    {
        "recipe": "tabular-classifier",
        "parameters": {
            "target": "label", "epochs": 1000, "batch_size": 1, "early_stopping_patience": 0
        },
        "dataset": {"path": str(victim_dir / "data.csv"), "format": "csv"},
        "resume_from": None,
        "output_dir": "output",
        "checkpoint_dir": "checkpoints",
        "checkpoint_every_s": 3600,
        "seed": 1,
        "max_runtime_s": None,
    },
)
_, hand_over = child_start(workdir=victim_dir, cuda_visible_devices="", threads=1)
victim = hand_over()  # its folder, once it says READY
try:
    # Past its start-up: the recipe is training on tenant A's rows.
    for line in victim.stdout:
        if line.startswith("@@"):
            break
    else:
        sys.exit("the victim child ended early: " + victim.stderr.read())
    _, hand_over = child_start(
        workdir=attempt_folder_create(root=root, job_id=2, attempt=1),
        cuda_visible_devices="",
        threads=1,
        command=(sys.executable, "-c", attack),
    )
    attacker = hand_over()
    out, err = attacker.communicate(timeout=120)
    print(json.dumps({"report": out, "stderr": err, "code": attacker.returncode}))
finally:
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
"""


def _without_capabilities() -> None:
    """Run as root would with no capability: the checks an ordinary user meets, but for files
    that belong to root, such as a non-dumpable process's /proc entries (listing its fd folder
    then works; reading where each fd leads still does not)."""
    libc = ctypes.CDLL(None, use_errno=True)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last + 1):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to lay out the work root as the image does"
)
@pytest.mark.slow
def test_a_hostile_child_reads_no_secret_and_no_other_attempts_files(tmp_path):
    home = tmp_path / "home"
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text(
        f"[default]\naws_secret_access_key = {SECRETS['AWS_SECRET_ACCESS_KEY']}\n"
    )
    # As in the image: the worker's user may create folders in the work root but neither list
    # it nor change its mode, since another user owns it.
    root = tmp_path / "work"
    root.mkdir()
    os.chown(root, NOBODY, NOBODY)
    root.chmod(0o1733)

    worker = subprocess.run(
        [sys.executable, "-c", WORKER, str(root), VICTIM_MARKER, ATTACK],
        cwd=REPO,
        env={**os.environ, **SECRETS, "HOME": str(home), "PYTHONPATH": str(REPO)},
        preexec_fn=_without_capabilities,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    outcome = json.loads(worker.stdout.strip().splitlines()[-1])
    assert outcome["code"] == 0, outcome["stderr"][-3000:]
    report = json.loads(outcome["report"])

    for attempt in ("parent environ", "parent memory", "parent open files", "work root listing"):
        assert report[attempt][0] == "refused", (attempt, report[attempt])
    assert not SECRETS.keys() & report["environ"].keys(), report["environ"]
    reached = {name: how for name, how in report.items() if name.startswith(("list ", "read "))}
    assert not reached, (report["leads"], reached)
    everything = json.dumps(report)
    assert not [name for name, value in SECRETS.items() if value in everything], everything[:3000]
    assert VICTIM_MARKER not in everything


PEEK = r"""
import json, sys
from pathlib import Path

seen = {}
for pid in sys.argv[1:]:
    try:
        seen[pid] = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError as exc:
        seen[pid] = type(exc).__name__
print(json.dumps(seen))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as an ordinary user would")
@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_a_child_cannot_read_the_environment_of_the_worker_or_its_pool_processes(tmp_path):
    """`manage.py run_worker` holds the database, broker and storage credentials, and so do its
    Celery pool processes: a process of the same user, as a job's child is, cannot read them."""
    from jobs.models import Worker

    name = f"private-{uuid.uuid4().hex[:6]}"
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [sys.executable, "manage.py", "run_worker", "--name", name],
            cwd=REPO,
            env=Pool(tmp_path).env,  # the test database and Redis, short timings
            preexec_fn=_without_capabilities,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: Worker.objects.filter(name=name).exists(), timeout=90, what="the worker")
        below = wait_for(
            lambda: alive(descendants(worker.pid)), timeout=60, what="its pool processes"
        )
        # Below the pool processes: the job children they keep warm, which hold no secret.
        job_children = set().union(*(descendants(pid) for pid in below))
        pool_processes = below - job_children
        peek = subprocess.run(
            [sys.executable, "-c", PEEK, *map(str, {worker.pid, *pool_processes, *job_children})],
            preexec_fn=_without_capabilities,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        seen = json.loads(peek.stdout)
        platform = {seen.pop(str(pid)) for pid in {worker.pid, *pool_processes}}
        assert platform == {"PermissionError"}, [text[:200] for text in platform]
        secrets = ("DATABASE_URL=", "REDIS_URL=", "CELERY_BROKER_URL=")
        assert not [text for text in seen.values() if any(s in text for s in secrets)]
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


# The trusted parent reads what the child names (checkpoints, result artifacts) as itself: a
# child that names a link must not make it read a file the worker can read and the job cannot.

HOSTILE = r"""
import json, os, shutil, sys

from jobs.runner.child import prepare

plan = json.loads(sys.argv[1])
own = prepare([])
for name, target in plan.get("links", {}).items():
    path = own / name
    if path.is_dir():
        path.rmdir()
    os.symlink(target, path)
for name, source in plan.get("copies", {}).items():
    shutil.copyfile(source, own / name)
for name, text in plan.get("writes", {}).items():
    (own / name).write_text(text)
for line in plan["lines"]:
    print(line, flush=True)
sys.exit(plan["exit"])
"""
LEAKED = "sk_live_stripe-secret-from-the-workers-files-5e1d"


def _checkpoint_line(path: str) -> str:
    return format_line("checkpoint", {"path": path, "step": 1})


def _result_line(**artifacts: str) -> str:
    return format_line(
        "result",
        {"metrics": {}, "artifacts": artifacts, "input_signature": {}, "parameters": {}},
    )


def _stored(storage) -> dict[str, bytes]:
    return {
        str(path.relative_to(storage.root)): path.read_bytes()
        for path in storage.root.rglob("*")
        if path.is_file()
    }


@pytest.fixture
def scene(local_storage, org, other_org, owner, member_factory, tmp_path, settings, monkeypatch):
    """Tenant B's files in storage, the worker's own secret files, and tenant A's stored data
    and model; the job's child is started with the parent's own `child_start`."""
    settings.WORKER_WORKDIR = str(tmp_path / "work")
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the child starts in /
    secrets_dir = tmp_path / "worker-secrets"
    secrets_dir.mkdir()
    (secrets_dir / "x").write_text(f"STRIPE_SECRET_KEY={LEAKED}\n")
    (secrets_dir / "service-account.json").write_text(json.dumps({"private_key": LEAKED}))
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(save_safetensors({"linear.weight": np.ones((2, 3), dtype=np.float32)}))
    dataset_file = tmp_path / "points.csv"
    dataset_file.write_bytes(_separable_csv(50))

    def stored_dataset(organization, actor):
        return dataset_version_create(
            dataset=dataset_create(organization=organization, name="points", actor=actor),
            path=dataset_file,
            filename="points.csv",
            actor=actor,
        )

    def stored_model(organization, actor):
        return model_version_register(
            registered_model=registered_model_create(
                organization=organization, name="scorer", actor=actor
            ),
            weights_path=weights,
            config={"layers": 1},
            actor=actor,
        )

    ours, theirs = Actor(user=owner), Actor(user=member_factory(other_org, "owner"))
    their_model, their_dataset = stored_model(other_org, theirs), stored_dataset(other_org, theirs)
    return SimpleNamespace(
        storage=local_storage,
        secrets=secrets_dir,
        weights=weights,
        dataset=stored_dataset(org, ours),
        model=stored_model(org, ours),
        their_weights=local_storage.path_for(
            their_model.artifacts.get(name="model.safetensors").storage_key
        ),
        their_rows=local_storage.path_for(their_dataset.storage_key),
    )


def _run_hostile(scene, monkeypatch, plan: dict, *, infer: bool = False) -> Job:
    monkeypatch.setattr(
        parent,
        "child_start",
        functools.partial(child_start, command=(sys.executable, "-c", HOSTILE, json.dumps(plan))),
    )
    worker = worker_register(name=f"cpu-{uuid.uuid4().hex[:6]}", devices=[])
    extra = {"kind": Job.Kind.INFER, "input_model_version": scene.model} if infer else {}
    job = JobFactory(
        organization=scene.dataset.organization,
        input_dataset_version=scene.dataset,
        output_dataset_name="predictions",
        **extra,
    )
    scheduler_pass()
    run_attempt(job_id=job.pk, attempt=1, worker_id=worker.pk)
    job.refresh_from_db()
    return job


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "plan", "infer"),
    [
        (
            "checkpoints/x",
            {"links": {"checkpoints/x": "/proc/self/environ"}, "exit": EXIT_STOPPED},
            False,
        ),
        ("checkpoints/x", {"links": {"checkpoints/x": "{secrets}/x"}, "exit": EXIT_STOPPED}, False),
        # A folder on the way is a link, and the file at its end a regular one.
        ("checkpoints", {"links": {"checkpoints": "{secrets}"}, "exit": EXIT_STOPPED}, False),
        (
            "output/config.json",
            {
                "links": {"output/config.json": "{secrets}/service-account.json"},
                "copies": {"output/model.safetensors": "{weights}"},
                "exit": EXIT_OK,
            },
            False,
        ),
        (
            "output/model.safetensors",
            {
                "links": {"output/model.safetensors": "{their_weights}"},
                "writes": {"output/config.json": '{"layers": 1}'},
                "exit": EXIT_OK,
            },
            False,
        ),
        (
            "output/predictions.csv",
            {"links": {"output/predictions.csv": "{their_rows}"}, "exit": EXIT_OK},
            True,
        ),
    ],
    ids=[
        "checkpoint-to-environ",
        "checkpoint-to-a-secret-file",
        "checkpoint-through-a-linked-folder",
        "config-to-a-secret-file",
        "weights-to-another-tenants-model",
        "predictions-to-another-tenants-dataset",
    ],
)
@pytest.mark.slow
def test_a_child_naming_a_link_fails_its_attempt_and_nothing_it_points_at_is_stored(
    scene, monkeypatch, name, plan, infer
):
    places = {
        "secrets": scene.secrets,
        "weights": scene.weights,
        "their_weights": scene.their_weights,
        "their_rows": scene.their_rows,
    }
    plan = {
        **plan,
        **{
            group: {path: target.format(**places) for path, target in plan.get(group, {}).items()}
            for group in ("links", "copies")
        },
    }
    if plan["exit"] == EXIT_STOPPED:
        plan["lines"] = [_checkpoint_line("checkpoints/x")]
    elif infer:
        plan["lines"] = [_result_line(**{"predictions.csv": "output/predictions.csv"})]
    else:
        plan["lines"] = [
            _result_line(
                **{
                    "model.safetensors": "output/model.safetensors",
                    "config.json": "output/config.json",
                }
            )
        ]
    environ = Path("/proc/self/environ").read_bytes()
    before = _stored(scene.storage)

    job = _run_hostile(scene, monkeypatch, plan, infer=infer)

    assert job.state == JobState.FAILED, (job.state, job.failure_reason)
    assert f"The job wrote {name} as a link; only regular files are read." in job.failure_reason
    after = _stored(scene.storage)
    leaks = [key for key, data in after.items() if LEAKED.encode() in data or environ in data]
    assert not leaks
    assert after.keys() == before.keys(), sorted(after.keys() - before.keys())
    assert not job.checkpoint_key
    assert job.output_model_version_id is None and job.output_dataset_version_id is None


def _laid_out(workdir: Path, layout: str, outside: Path) -> None:
    (workdir / "checkpoints").mkdir()
    target = workdir / "checkpoints" / "x"
    if layout == "folder":
        target.mkdir()
    elif layout == "file on the way":
        (workdir / "checkpoints").rmdir()
        (workdir / "checkpoints").write_bytes(b"not a folder")
    elif layout == "linked folder":
        (workdir / "checkpoints").rmdir()
        (workdir / "checkpoints").symlink_to(outside)


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        ("folder", "The job wrote checkpoints/x as a folder; only regular files are read."),
        ("missing", "The job named checkpoints/x, which it did not write."),
        ("file on the way", "The job wrote checkpoints as a file where its path needs a folder."),
        ("linked folder", "The job wrote checkpoints as a link; only regular files are read."),
    ],
)
def test_the_parent_refuses_what_is_not_a_regular_file_at_once_and_deletes_nothing_outside(
    tmp_path, layout, reason
):
    """A swapped folder must not make the removal of a read checkpoint delete the worker's own
    file."""
    workdir, outside = tmp_path / "attempt", tmp_path / "workers-own"
    workdir.mkdir()
    outside.mkdir()
    (outside / "x").write_text("the worker's file")
    _laid_out(workdir, layout, outside)

    with (
        pytest.raises(ChildFileRefused) as refused,
        child_file_open(workdir, "checkpoints/x", remove=True),
    ):
        pass

    assert str(refused.value) == reason
    assert (outside / "x").read_text() == "the worker's file"


def test_a_regular_checkpoint_is_read_and_then_removed(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "x").write_bytes(b"state")
    with child_file_open(tmp_path, "./checkpoints//x", remove=True) as stream:
        assert stream.read() == b"state"
    assert not (tmp_path / "checkpoints" / "x").exists()


def test_a_pipe_named_as_a_checkpoint_is_refused_without_waiting_for_a_writer(tmp_path):
    """Opened as a file, a pipe with no writer would hold the worker, and its lease, forever."""
    (tmp_path / "checkpoints").mkdir()
    pipe = tmp_path / "checkpoints" / "x"
    os.mkfifo(pipe)
    outcome = {}

    def read():
        try:
            with child_file_open(tmp_path, "checkpoints/x") as stream:
                outcome["read"] = stream.read()
        except ChildFileRefused as exc:
            outcome["refused"] = str(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    stuck = reader.is_alive()
    if stuck:
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # lets the stuck reader go
        reader.join()
    assert not stuck, "the worker waited on the pipe for a writer"
    assert outcome == {
        "refused": "The job wrote checkpoints/x as a pipe; only regular files are read."
    }
