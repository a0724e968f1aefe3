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
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

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
victim = child_start(workdir=victim_dir, cuda_visible_devices="", threads=1)
try:
    # Past its start-up: the recipe is training on tenant A's rows.
    for line in victim.stdout:
        if line.startswith("@@"):
            break
    else:
        sys.exit("the victim child ended early: " + victim.stderr.read())
    attacker = child_start(
        workdir=attempt_folder_create(root=root, job_id=2, attempt=1),
        cuda_visible_devices="",
        threads=1,
        command=(sys.executable, "-c", attack),
    )
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
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
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
        pool_processes = wait_for(
            lambda: alive(descendants(worker.pid)), timeout=60, what="its pool processes"
        )
        peek = subprocess.run(
            [sys.executable, "-c", PEEK, *map(str, {worker.pid, *pool_processes})],
            preexec_fn=_without_capabilities,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        seen = json.loads(peek.stdout)
        assert seen and set(seen.values()) == {"PermissionError"}, {
            pid: text[:200] for pid, text in seen.items()
        }
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
