"""Predict latency through the platform against the same model called in-process, requests per
second per replica, what a shadow route adds, and cold start from zero replicas.

    .venv/bin/python -m bench.serving              # full run, about 7 minutes
    .venv/bin/python -m bench.serving --quick      # smoke run, about 4 minutes

Starts, on this machine, the pool (celery beat, a default-queue Celery worker and one CPU worker,
`manage.py run_worker`, with WORKER_CPU_SLOTS slots, so each replica's child gets one torch
thread) and the web process as production runs it (gunicorn, `--workers 3` sync workers, the
production image's CMD, on `bench.load_settings`: production settings with the API rate limits
raised so the bench is never throttled, though every request still counts against them). All
processes share one settings module, one SECRET_KEY (the web derives each replica's token from
it), the PostgreSQL database `factory_saas_servebench` (created afresh each run) and Redis db 10
(flushed). Scheduler and reconciler periods are production's defaults.

Two models are trained here first, each by its recipe on the recipe's sample data: a small
tabular classifier (six columns, hidden layer of 16) and the image classifier (32 x 32 PNGs,
the recipe's default network). Both are registered, and served by deployments with one replica
each (min_replicas 1): `tabular`, `image`, and `tabular-shadow` (the tabular version live and a
second version of the same weights as a 100% shadow route, on its own replica).

Per model, four tiers with one input per request, 1 client then 8 clients, in interleaved rounds:
- in-process: the recipe's `online_predictor` called directly in this process (one torch
  thread, as the replica's child; at 8 clients the calls take a lock, as the replica answers one
  batch at a time);
- replica: its HTTP server called directly with the attempt's token over a keep-alive client
  (the web's own hop, without the web);
- bare-api: GET /api/v1/bench/key/ on the same gunicorn with the same key (bench/load.py's
  floor: a constant answer behind the API key's authentication), what any API request costs
  the web before it does anything;
- platform: POST /api/v1/orgs/<slug>/deployments/<name>/predict with an API key, a new
  connection per request (sync gunicorn closes every connection), `X-Forwarded-Proto: https`.
Overhead = platform minus in-process at the same percentile. Beside each window, the CPU
time per request of gunicorn's workers, the database's backends and the replica's child, from
/proc. The platform's throughput at 8
clients against one replica is its requests per second per replica.

Shadow: 1 client, rounds alternating `tabular` and `tabular-shadow` (the same live version);
the added p50 is the median of the rounds' differences. Cold start: a new deployment with
min_replicas 0; a client posts every 50 ms (the 503's Retry-After says 30 s; this client does not
wait that long) from its first request to its first 200, split into legs from the rows' times.
Then the web's worker setting: 8 clients against gunicorn with 1 and 3 sync workers and with 3
gthread workers of 4 threads, restarted for each. Finally, the queries one predict makes, counted
in this process through the same DRF view.

The machine is shared and noisy: compare the figures of one run, and read medians and ratios.
The table goes to stdout, ending with one `RESULT {json}` line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.databases import drop_database, ensure_database, migrate  # noqa: E402
from bench.gunicorn import gunicorn  # noqa: E402

DATABASE_URL = os.environ.get(
    "BENCH_SERVING_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/factory_saas_servebench"
)
REDIS_URL = os.environ.get("BENCH_SERVING_REDIS_URL", "redis://127.0.0.1:6379/10")
SETTINGS_MODULE = "bench.load_settings"
WORKER_NAME = "serving-bench"
SLOTS = 8
TARGET_OVERHEAD_P50_MS = 5.0
TARGET_SHADOW_P50_MS = 0.5
TARGET_COLD_START_S = 5.0
START_TIMEOUT_S = 60
READY_TIMEOUT_S = 240
CLIENTS = (1, 8)
POLL_S = 0.05
WEB_CONFIGS = (("sync", 1, 1), ("sync", 3, 1), ("gthread", 3, 4))


@dataclass(frozen=True)
class Plan:
    rounds: int
    window_s: float
    shadow_rounds: int
    shadow_window_s: float
    cold_starts: int
    config_window_s: float


FULL = Plan(
    rounds=3, window_s=4.0, shadow_rounds=6, shadow_window_s=3.0, cold_starts=3, config_window_s=4
)
QUICK = Plan(
    rounds=1, window_s=1.5, shadow_rounds=2, shadow_window_s=1.5, cold_starts=1, config_window_s=1.5
)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, about 4 minutes")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run(QUICK if args.quick else FULL, quick=args.quick)


# --- set-up ----------------------------------------------------------------------------------


@dataclass
class Served:
    """A model, its predictor in this process, and one input of its recipe's contract."""

    label: str  # tabular, image
    deployment: str
    model_dir: Path
    recipe: type
    item: dict
    predictor: Callable | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def run(plan: Plan, *, quick: bool) -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp_name:
        tmp = Path(tmp_name)
        env = {
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "SECRET_KEY": "serving-bench-" + "k7Qz" * 10,
            "DATABASE_URL": DATABASE_URL,
            "REDIS_URL": REDIS_URL,
            "CELERY_BROKER_URL": REDIS_URL,
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "CONN_MAX_AGE": "60",
            "STRIPE_SECRET_KEY": "",
            "STORAGE_BACKEND": "local",
            "STORAGE_LOCAL_ROOT": str(tmp / "storage"),
            "WORKER_WORKDIR": str(tmp / "work"),
            "WORKER_CPU_SLOTS": str(SLOTS),
            # Job children start in "/": without this they would import the checkout the
            # environment installed, not this one.
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            ),
        }
        progress(f"recreating {DATABASE_URL} and flushing {REDIS_URL}")
        drop_database(DATABASE_URL)
        ensure_database(DATABASE_URL)
        migrate(env)
        flush_redis()
        os.environ.update(env)
        import django

        django.setup()
        import torch

        torch.set_num_threads(1)  # as each replica's child: cpu_count // slots, at least 1
        models = train_models(tmp)
        tenant = create_tenant(models)
        pool = Pool(tmp, env)
        figures: dict = {}
        try:
            progress("starting beat, the default-queue worker and the CPU worker")
            pool.start()
            wait_ready(pool, tenant, ["tabular", "image", "tabular-shadow"])
            with gunicorn(env, tmp, kind="sync", workers=3, threads=1) as (port, master):
                warm_up(port, tenant, models)
                figures["tiers"] = measure_tiers(port, master, tenant, models, plan)
                figures["shadow"] = measure_shadow(port, master, tenant, models["tabular"], plan)
                figures["cold"] = [
                    measure_cold_start(port, tenant, models["tabular"], n, pool)
                    for n in range(plan.cold_starts)
                ]
            figures["configs"] = measure_configs(env, tmp, tenant, models, plan)
            figures["queries"] = count_queries(tenant, models["tabular"])
        except BaseException:
            progress(pool.logs())
            raise
        finally:
            pool.stop()
    flush_redis()
    report(figures, plan=plan, quick=quick, loads=(load_before, os.getloadavg()))


def flush_redis() -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    finally:
        client.close()


def _context(recipe, tmp: Path, dataset: Path, fmt: str, parameters: dict):
    from jobs.recipes.base import RecipeContext, validate_parameters

    workdir = tmp / f"train-{recipe.name}"
    workdir.mkdir()
    return RecipeContext(
        workdir=workdir,
        dataset_path=dataset,
        dataset_format=fmt,
        parameters=validate_parameters(recipe, parameters),
        seed=1,
        output_dir=workdir / "out",
        checkpoint_dir=workdir / "checkpoints",
        checkpoint_every_s=3600.0,
        devices=["cpu"],
        emit=lambda line: None,
    )


def train_models(tmp: Path) -> dict[str, Served]:
    """Each recipe trains its model on its sample data, here, in a few seconds."""
    import csv

    from jobs.recipes.images import ImageClassifier
    from jobs.recipes.tabular import TabularClassifier
    from jobs.samples.images import write_image_sample
    from jobs.samples.tabular import write_tabular_sample

    progress("training the tabular and the image model")
    rows_csv = tmp / "churn.csv"
    write_tabular_sample(rows_csv, rows=1000, seed=1)
    tabular = _context(
        TabularClassifier,
        tmp,
        rows_csv,
        "csv",
        {"target": "label", "epochs": 2, "hidden_sizes": [16]},
    )
    TabularClassifier().train(tabular)
    with rows_csv.open(newline="") as handle:
        first = next(csv.DictReader(handle))
    row = {
        "age": int(first["age"]),
        "monthly_spend": float(first["monthly_spend"]) if first["monthly_spend"] else None,
        "tenure_months": int(first["tenure_months"]),
        "support_calls": int(first["support_calls"]),
        "plan": first["plan"],
        "region": first["region"],
    }
    images_zip = tmp / "shapes.zip"
    write_image_sample(images_zip, per_class=20, size=32, seed=1)
    image = _context(
        ImageClassifier, tmp, images_zip, "image_folder_zip", {"image_size": 32, "epochs": 1}
    )
    ImageClassifier().train(image)
    with zipfile.ZipFile(images_zip) as archive:
        png = archive.read(sorted(archive.namelist())[0])
    return {
        "tabular": Served("tabular", "tabular", tabular.output_dir, TabularClassifier, row),
        "image": Served(
            "image",
            "image",
            image.output_dir,
            ImageClassifier,
            {"image": base64.b64encode(png).decode()},
        ),
    }


@dataclass
class Tenant:
    organization: object
    token: str
    versions: dict  # name -> ModelVersion
    resource_class: object
    owner: object

    def url(self, deployment: str) -> str:
        return f"/api/v1/orgs/{self.organization.slug}/deployments/{deployment}/predict/"


def create_tenant(models: dict[str, Served]) -> Tenant:
    from jobs.models import ResourceClass
    from registry.services.model_versions import model_version_register, registered_model_create
    from serving.services import deployment_create
    from tenants.actors import Actor
    from tenants.models import User
    from tenants.services import api_key_create, organization_create

    owner = User.objects.create_user(email="serving-bench@example.com")
    actor = Actor(user=owner)
    organization = organization_create(name="Serving bench", owner=owner, actor=actor)
    _key, token = api_key_create(
        organization=organization, name="bench", scopes=["predict"], actor=actor
    )
    versions = {}
    for name, served, copies in (("tabular", models["tabular"], 2), ("image", models["image"], 1)):
        registered = registered_model_create(organization=organization, name=name, actor=actor)
        config = json.loads((served.model_dir / "config.json").read_text())
        for number in range(copies):
            versions[f"{name}-{number + 1}"] = model_version_register(
                registered_model=registered,
                weights_path=served.model_dir / "model.safetensors",
                config=config,
                actor=actor,
                recipe_name=served.recipe.name,
            )
    cpu = ResourceClass.objects.get(name="cpu")

    def live(version: str, mode: str = "live") -> dict:
        return {"model_version": versions[version].pk, "weight": 100, "mode": mode}

    for name, recipe, routes in (
        ("tabular", "tabular-classifier", [live("tabular-1")]),
        ("image", "image-classifier", [live("image-1")]),
        ("tabular-shadow", "tabular-classifier", [live("tabular-1"), live("tabular-2", "shadow")]),
    ):
        deployment_create(
            organization=organization,
            name=name,
            recipe=recipe,
            resource_class=cpu,
            actor=actor,
            routes=routes,
            min_replicas=1,
            max_replicas=1,
        )
    return Tenant(organization, token, versions, cpu, owner)


class Pool:
    """Beat, a default-queue Celery worker and one CPU worker, each in its own session."""

    def __init__(self, tmp: Path, env: dict):
        self.tmp, self.env = tmp, {**os.environ, **env}
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self) -> None:
        from jobs.models import Worker

        python = sys.executable
        celery = [python, "-m", "celery", "-A", "factory_saas"]
        self._start("beat", [*celery, "beat", "-l", "warning", "-s", str(self.tmp / "beat")])
        self._start(
            "default",
            [*celery, "worker", "-Q", "default", "-c", "1", "-l", "warning", "-n", "default@%h"],
        )
        self._start("worker", [python, "manage.py", "run_worker", "--name", WORKER_NAME])
        deadline = time.monotonic() + START_TIMEOUT_S
        while not Worker.objects.filter(name=WORKER_NAME).exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit(f"worker {WORKER_NAME} did not register in {START_TIMEOUT_S} s")
            time.sleep(0.1)

    def _start(self, label: str, args: list[str]) -> None:
        with (self.tmp / f"{label}.log").open("w") as log:
            self.processes[label] = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        for label, process in self.processes.items():
            if process.poll() is not None:
                raise SystemExit(f"{label} exited with {process.returncode}")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.tmp.glob("*.log"))
        )


def wait_ready(pool: Pool, tenant: Tenant, names: list[str]) -> None:
    from serving.models import Replica

    progress(f"waiting for the replicas of {', '.join(names)}")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        ready = set(
            Replica.objects.filter(
                deployment__organization=tenant.organization,
                deployment__name__in=names,
                state=Replica.State.READY,
            ).values_list("deployment__name", flat=True)
        )
        if ready >= set(names):
            return
        pool.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"replicas not ready after {READY_TIMEOUT_S} s: only {sorted(ready)}")
        time.sleep(0.2)


def replica_of(tenant: Tenant, deployment: str) -> tuple[str, str]:
    """The address and bearer token of the deployment's ready replica."""
    from jobs.services.replicas import replica_token
    from serving.models import Replica

    replica = Replica.objects.select_related("job").get(
        deployment__organization=tenant.organization,
        deployment__name=deployment,
        state=Replica.State.READY,
    )
    return replica.job.serve_address, replica_token(replica.job_id, replica.job.attempt)


# --- the three ways to call a model -----------------------------------------------------------


def platform_call(port: int, tenant: Tenant, deployment: str, body: bytes) -> Callable[[], int]:
    return _web_call(port, tenant, "POST", tenant.url(deployment), body)


def bare_api_call(port: int, tenant: Tenant) -> Callable[[], int]:
    """bench/load.py's floor on the same gunicorn: a constant JSON answer behind the API key's
    authentication, what any authenticated API request costs before doing anything."""
    return _web_call(port, tenant, "GET", "/api/v1/bench/key/", None)


def _web_call(port: int, tenant: Tenant, method: str, url: str, body: bytes | None):
    headers = {
        "Authorization": f"Bearer {tenant.token}",
        "Content-Type": "application/json",
        "X-Forwarded-Proto": "https",
    }

    def call() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request(method, url, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    return call


def replica_call(address: str, token: str, body: bytes) -> Callable[[], int]:
    """One keep-alive connection per client thread, as the web's pooled client keeps them."""
    local = threading.local()
    host, port = address.rsplit(":", 1)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def call() -> int:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/predict", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status

    return call


def in_process_call(served: Served) -> Callable[[], int]:
    if served.predictor is None:
        served.predictor = served.recipe.online_predictor(served.model_dir)
    inputs = [served.item]

    def call() -> int:
        with served.lock:  # the replica answers one batch at a time
            served.predictor(inputs)
        return 200

    return call


@dataclass
class Window:
    latencies_ms: list[float]
    errors: int
    seconds: float
    statuses: Counter
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per request, by process group

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def pct(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def closed_loop(call: Callable[[], int], *, clients: int, seconds: float) -> Window:
    """`clients` threads, each calling as soon as its last call returned, for `seconds`."""
    results: list[tuple[float, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    end_at = [0.0]

    def client() -> None:
        mine = []
        start.wait()
        while time.perf_counter() < end_at[0]:
            sent = time.perf_counter()
            try:
                status = call()
            except (OSError, http.client.HTTPException):
                status = 0
            mine.append(((time.perf_counter() - sent) * 1000, status))
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    end_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    ok = [ms for ms, status in results if status == 200]
    return Window(ok, len(results) - len(ok), elapsed, Counter(s for _, s in results))


# --- measurements ----------------------------------------------------------------------------


def cpu_groups(master: int, replica_port: int) -> dict[str, list[int]]:
    """The processes whose CPU a request costs: gunicorn's workers, this database's PostgreSQL
    backends (the pool's among them, idle meanwhile), and the replica's child (the process
    listening on its port)."""
    import psycopg

    name = DATABASE_URL.rsplit("/", 1)[1]
    maintenance = DATABASE_URL.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(maintenance, autocommit=True) as conn:
        backends = [
            row[0]
            for row in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", [name])
        ]
    return {"web": children_of(master), "db": backends, "replica": listening_on(replica_port)}


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """CPU seconds so far of each of `pids` still alive."""
    seconds = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            seconds[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used in between by the processes alive at both samples (a backend that ends in
    between takes its share with it: this errs low)."""
    return sum(seconds - before[pid] for pid, seconds in after.items() if pid in before)


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def listening_on(port: int) -> list[int]:
    """The process holding the listening socket of `port` (from /proc/net/tcp's inode)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(f"socket:[{fields[9]}]")
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                found.append(int(fd_dir.parent.name))
    return found


def warm_up(port: int, tenant: Tenant, models: dict[str, Served]) -> None:
    """Every gunicorn worker and both predictors past their first calls; a failed request here
    stops the run with the server's answer."""
    for served in models.values():
        body = json.dumps({"inputs": [served.item]}).encode()
        for deployment in (
            {served.deployment, "tabular-shadow"}
            if served.label == "tabular"
            else {served.deployment}
        ):
            for _ in range(20):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request(
                    "POST",
                    tenant.url(deployment),
                    body=body,
                    headers={
                        "Authorization": f"Bearer {tenant.token}",
                        "Content-Type": "application/json",
                        "X-Forwarded-Proto": "https",
                    },
                )
                response = conn.getresponse()
                content = response.read()
                conn.close()
                if response.status != 200:
                    raise SystemExit(f"{deployment}: {response.status} {content[:500]!r}")
        call = in_process_call(served)
        for _ in range(20):
            call()


TIERS = ("in-process", "replica", "bare-api", "platform")


def measure_tiers(
    port: int, master: int, tenant: Tenant, models: dict[str, Served], plan: Plan
) -> dict:
    """{model: {tier: {clients: [Window per round]}}}, the tiers interleaved in each round."""
    figures: dict = {}
    calls, replicas = {}, {}
    for name, served in models.items():
        body = json.dumps({"inputs": [served.item]}).encode()
        address, token = replica_of(tenant, served.deployment)
        replicas[name] = int(address.rsplit(":", 1)[1])
        calls[name] = {
            "in-process": in_process_call(served),
            "replica": replica_call(address, token, body),
            "bare-api": bare_api_call(port, tenant),
            "platform": platform_call(port, tenant, served.deployment, body),
        }
        figures[name] = {tier: {c: [] for c in CLIENTS} for tier in TIERS}
    for number in range(plan.rounds):
        for name in models:
            for clients in CLIENTS:
                for tier in TIERS:
                    groups = cpu_groups(master, replicas[name])
                    before = {group: cpu_seconds(pids) for group, pids in groups.items()}
                    window = closed_loop(calls[name][tier], clients=clients, seconds=plan.window_s)
                    requests = max(1, len(window.latencies_ms) + window.errors)
                    window.cpu_ms = {
                        group: cpu_used(before[group], cpu_seconds(pids)) / requests * 1000
                        for group, pids in groups.items()
                    }
                    figures[name][tier][clients].append(window)
                    progress(
                        f"round {number + 1} {name:8} {tier:10} {clients} clients: "
                        f"p50 {window.pct(50):7.2f} ms, p99 {window.pct(99):7.2f} ms, "
                        f"{window.rps:7.1f} req/s, errors {window.errors}"
                    )
    return figures


def measure_shadow(port: int, master: int, tenant: Tenant, served: Served, plan: Plan) -> dict:
    """Windows with and without a 100% shadow route, each with the web's CPU per request (what
    the copy costs the live path itself, apart from the cores the drain and the shadow replica
    take from everything else on this machine)."""
    body = json.dumps({"inputs": [served.item]}).encode()
    calls = {
        "without": platform_call(port, tenant, "tabular", body),
        "with": platform_call(port, tenant, "tabular-shadow", body),
    }
    windows: dict[str, list[Window]] = {"without": [], "with": []}
    for number in range(plan.shadow_rounds):
        order = ("without", "with") if number % 2 == 0 else ("with", "without")
        for kind in order:
            web = children_of(master)
            before = cpu_seconds(web)
            window = closed_loop(calls[kind], clients=1, seconds=plan.shadow_window_s)
            requests = max(1, len(window.latencies_ms) + window.errors)
            window.cpu_ms = {"web": cpu_used(before, cpu_seconds(web)) / requests * 1000}
            windows[kind].append(window)
        progress(
            f"shadow round {number + 1}: p50 without {windows['without'][-1].pct(50):.2f} ms, "
            f"with {windows['with'][-1].pct(50):.2f} ms"
        )
    return windows


@dataclass(frozen=True)
class ColdStart:
    first_200_s: float
    requests: int  # answered 503 before the first 200
    replica_created_s: float  # the first request's cold_start wrote the replica row
    job_started_s: float | None  # the worker started the attempt
    serving_s: float | None  # the child's server answered (the job's serve_ready_at)
    replica_ready_s: float | None  # the replica row READY (the reconciler's pass)
    other_statuses: Counter


def measure_cold_start(port: int, tenant: Tenant, served: Served, number: int, pool) -> ColdStart:
    from jobs.models import TERMINAL_STATES, Job, JobEvent
    from serving.models import Deployment, Replica
    from serving.services import deployment_create, deployment_delete
    from tenants.actors import Actor

    actor = Actor(user=tenant.owner)
    name = f"cold-{number + 1}"
    deployment = deployment_create(
        organization=tenant.organization,
        name=name,
        recipe="tabular-classifier",
        resource_class=tenant.resource_class,
        actor=actor,
        routes=[{"model_version": tenant.versions["tabular-1"].pk, "weight": 100, "mode": "live"}],
        min_replicas=0,
        max_replicas=1,
    )
    call = platform_call(port, tenant, name, json.dumps({"inputs": [served.item]}).encode())
    statuses: Counter = Counter()
    wall_start = time.time()
    started = time.perf_counter()
    deadline = started + READY_TIMEOUT_S
    while True:
        status = call()
        if status == 200:
            break
        statuses[status] += 1
        if time.perf_counter() > deadline:
            raise SystemExit(f"{name}: no 200 after {READY_TIMEOUT_S} s: {dict(statuses)}")
        pool.check_alive()
        time.sleep(POLL_S)
    first_200 = time.perf_counter() - started
    replica = Replica.objects.select_related("job").get(deployment=deployment)
    job = replica.job
    started_event = (
        JobEvent.objects.filter(job_id=job.pk, kind="started")
        .values_list("created_at", flat=True)
        .first()
    )

    def after(moment) -> float | None:
        return None if moment is None else moment.timestamp() - wall_start

    result = ColdStart(
        first_200_s=first_200,
        requests=statuses[503],
        replica_created_s=after(replica.created_at),
        job_started_s=after(started_event),
        serving_s=after(job.serve_ready_at),
        replica_ready_s=after(replica.ready_at),
        other_statuses=Counter({k: v for k, v in statuses.items() if k != 503}),
    )
    progress(f"cold start {number + 1}: first 200 after {first_200:.2f} s ({statuses[503]} x 503)")
    deployment_delete(deployment=Deployment.objects.get(pk=deployment.pk), actor=actor)
    deadline = time.monotonic() + 60
    while Job.objects.get(pk=job.pk).state not in TERMINAL_STATES:
        if time.monotonic() > deadline:
            raise SystemExit(f"{name}'s replica job did not stop in 60 s")
        time.sleep(0.2)
    return result


def measure_configs(env: dict, tmp: Path, tenant: Tenant, models: dict, plan: Plan) -> dict:
    """{(kind, workers, threads): {model: Window at 8 clients}}."""
    figures = {}
    for kind, workers, threads in WEB_CONFIGS:
        with gunicorn(env, tmp, kind=kind, workers=workers, threads=threads) as (port, _master):
            warm_up(port, tenant, models)
            figures[(kind, workers, threads)] = {}
            for name, served in models.items():
                body = json.dumps({"inputs": [served.item]}).encode()
                call = platform_call(port, tenant, served.deployment, body)
                window = closed_loop(call, clients=8, seconds=plan.config_window_s)
                figures[(kind, workers, threads)][name] = window
                progress(
                    f"web {kind} {workers}x{threads}, {name}, 8 clients: {window.rps:.1f} req/s, "
                    f"p50 {window.pct(50):.2f} ms, p99 {window.pct(99):.2f} ms"
                )
    return figures


def count_queries(tenant: Tenant, served: Served) -> list[str]:
    """The SQL one predict runs, through the same DRF view, in this process (the bench's
    settings; the throttle and cache are Redis, not counted here)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {tenant.token}")
    body = {"inputs": [served.item]}
    for _ in range(3):  # past the first request's one-off queries
        client.post(tenant.url("tabular"), body, format="json", secure=True, HTTP_HOST="127.0.0.1")
    with CaptureQueriesContext(connection) as captured:
        response = client.post(
            tenant.url("tabular"), body, format="json", secure=True, HTTP_HOST="127.0.0.1"
        )
    if response.status_code != 200:
        raise SystemExit(f"counting queries: {response.status_code} {response.content[:300]!r}")
    return [query["sql"] for query in captured.captured_queries]


# --- report ----------------------------------------------------------------------------------


def _summary(sql: str) -> str:
    """The statement's verb and its table, skipping the tables of subqueries (words inside
    parentheses)."""
    words, depth = [], 0
    for word in sql.split():
        if depth == 0:
            words.append(word)
        depth += word.count("(") - word.count(")")
    verb = words[0].upper() if words else "?"
    for keyword in ("FROM", "INTO", "UPDATE"):
        if keyword in words[:-1]:
            following = words[words.index(keyword) + 1]
            return f"{verb} {following.strip(chr(34))}"
    return verb


def report(figures: dict, *, plan: Plan, quick: bool, loads) -> None:
    med = statistics.median
    tiers, shadow, colds = figures["tiers"], figures["shadow"], figures["cold"]
    print(
        f"Serving: one replica per deployment on a CPU worker ({SLOTS} slots, 1 torch thread "
        "per replica), web = gunicorn 3 sync workers on production settings; "
        f"{plan.rounds} round(s) of {plan.window_s:g} s per tier; load average "
        f"{loads[0][0]:.2f} before, {loads[1][0]:.2f} after{' (quick)' if quick else ''}"
    )
    print()
    print("1. Predict latency, one input per request (medians of the rounds)")
    print(
        f"   {'model':8}{'clients':>8}  {'tier':11}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}"
        f"{'errors':>8}{'p50 - in-process':>18}{'p99 - in-process':>18}"
        f"{'CPU ms/request: web':>21}{'db':>6}{'replica':>9}"
    )
    result_models = {}
    for name, by_tier in tiers.items():
        for clients in CLIENTS:
            base = by_tier["in-process"][clients]
            base50 = med(w.pct(50) for w in base)
            base99 = med(w.pct(99) for w in base)
            for tier in TIERS:
                windows = by_tier[tier][clients]
                p50, p99 = med(w.pct(50) for w in windows), med(w.pct(99) for w in windows)
                rps = med(w.rps for w in windows)
                errors = sum(w.errors for w in windows)
                cpu = {
                    group: med(w.cpu_ms.get(group, 0.0) for w in windows)
                    for group in ("web", "db", "replica")
                }
                print(
                    f"   {name:8}{clients:>8}  {tier:11}{p50:9.2f}{p99:9.2f}{rps:9.1f}{errors:8}"
                    f"{p50 - base50:18.2f}{p99 - base99:18.2f}"
                    f"{cpu['web']:21.2f}{cpu['db']:6.2f}{cpu['replica']:9.2f}"
                )
                if tier == "platform":
                    result_models.setdefault(name, {})[f"{clients}_clients"] = {
                        "p50_ms": round(p50, 2),
                        "p99_ms": round(p99, 2),
                        "rps": round(rps, 1),
                        "overhead_p50_ms": round(p50 - base50, 2),
                        "overhead_p99_ms": round(p99 - base99, 2),
                        "web_cpu_ms": round(cpu["web"], 2),
                        "db_cpu_ms": round(cpu["db"], 2),
                    }
    print(
        "   CPU ms/request: CPU time that gunicorn's workers, this database's PostgreSQL backends "
        "and the replica's child used during the window, per request (what the shared "
        "machine's other load moves least)"
    )
    tab = tiers["tabular"]
    overhead_p50 = med(w.pct(50) for w in tab["platform"][1]) - med(
        w.pct(50) for w in tab["in-process"][1]
    )
    overhead_p99 = med(w.pct(99) for w in tab["platform"][1]) - med(
        w.pct(99) for w in tab["in-process"][1]
    )
    rps_per_replica = med(w.rps for w in tab["platform"][8])
    replica_rps = med(w.rps for w in tab["replica"][8])
    verdict = "met" if overhead_p50 < TARGET_OVERHEAD_P50_MS else "MISSED"
    print(
        f"   target: overhead p50 at 1 client < {TARGET_OVERHEAD_P50_MS:g} ms (tabular): {verdict} "
        f"({overhead_p50:.2f} ms; p99 {overhead_p99:.2f} ms)"
    )
    p50_of = {tier: med(w.pct(50) for w in tab[tier][1]) for tier in TIERS}
    floor = p50_of["bare-api"]
    hop = p50_of["replica"] - p50_of["in-process"]
    print(
        f"   of the overhead at p50, 1 client: the web's floor for any API-key request (bare-api) "
        f"{floor:.2f} ms, the replica's hop {hop:.2f} ms, the gateway's own work "
        f"{overhead_p50 - floor - hop:.2f} ms"
    )
    print(
        f"   requests per second per replica (tabular, 8 clients through the platform): "
        f"{rps_per_replica:.1f}; the replica called directly: {replica_rps:.1f}; in-process: "
        f"{med(w.rps for w in tab['in-process'][8]):.1f}"
    )
    print()
    without = [w.pct(50) for w in shadow["without"]]
    with_ = [w.pct(50) for w in shadow["with"]]
    added = med(b - a for a, b in zip(without, with_, strict=True))
    print(
        f"2. Shadow route (tabular, 1 client, {plan.shadow_rounds} alternating rounds of "
        f"{plan.shadow_window_s:g} s): p50 without {med(without):.2f} ms, with a 100% shadow "
        f"route {med(with_):.2f} ms; added (median of the rounds' differences) {added:+.2f} ms"
    )
    print(
        f"   p99 without {med(w.pct(99) for w in shadow['without']):.2f} ms, with "
        f"{med(w.pct(99) for w in shadow['with']):.2f} ms"
    )
    web_without = med(w.cpu_ms["web"] for w in shadow["without"])
    web_with = med(w.cpu_ms["web"] for w in shadow["with"])
    print(
        f"   the web's CPU per request without {web_without:.2f} ms, with {web_with:.2f} ms "
        f"({web_with - web_without:+.2f} ms: queuing the copy; sending it is the control plane's)"
    )
    verdict = "met" if added < TARGET_SHADOW_P50_MS else "MISSED"
    print(f"   target: shadow adds < {TARGET_SHADOW_P50_MS:g} ms at p50: {verdict}")
    print()
    cold = med(c.first_200_s for c in colds)
    print(
        f"3. Cold start from zero replicas (tabular), {len(colds)} run(s): first request -> "
        "first 200, with each leg's moment after the first request"
    )
    print(
        f"   {'run':5}{'first 200 s':>12}{'503s':>6}{'replica row':>13}{'job started':>13}"
        f"{'serving':>9}{'row READY':>11}"
    )

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for number, c in enumerate(colds):
        print(
            f"   {number + 1:<5}{c.first_200_s:12.2f}{c.requests:6}{cell(c.replica_created_s):>13}"
            f"{cell(c.job_started_s):>13}{cell(c.serving_s):>9}{cell(c.replica_ready_s):>11}"
            + (f"  other statuses {dict(c.other_statuses)}" if c.other_statuses else "")
        )
    verdict = "met" if cold < TARGET_COLD_START_S else "MISSED"
    print(f"   target: cold start < {TARGET_COLD_START_S:g} s: {verdict} (median {cold:.2f} s)")
    print()
    print("4. The web's workers, 8 clients, one replica per model")
    print(f"   {'gunicorn':22}{'model':9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for (kind, workers, threads), by_model in figures["configs"].items():
        for name, window in by_model.items():
            print(
                f"   {f'{kind} {workers} x {threads} threads':22}{name:9}{window.rps:9.1f}"
                f"{window.pct(50):9.2f}{window.pct(99):9.2f}{window.errors:8}"
            )
    for name in tiers:
        alone = med(w.rps for w in tiers[name]["replica"][8])
        print(f"   {name}: the replica alone at 8 clients {alone:.1f} req/s")
    print()
    queries = figures["queries"]
    print(f"5. SQL queries of one predict (tabular, the DRF view in this process): {len(queries)}")
    for summary, count in Counter(_summary(q) for q in queries).most_common():
        print(f"   {count:3} x {summary}")
    result = {
        "overhead_p50_ms": round(overhead_p50, 2),
        "overhead_p99_ms": round(overhead_p99, 2),
        "rps_per_replica": round(rps_per_replica, 1),
        "shadow_added_p50_ms": round(added, 2),
        "bare_api_p50_ms": round(floor, 2),
        "cold_start_s": round(cold, 2),
        "queries_per_predict": len(queries),
        "models": result_models,
    }
    print(f"RESULT {json.dumps(result)}")


if __name__ == "__main__":
    main()
