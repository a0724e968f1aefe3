"""Speed and peak memory growth of the web worker while a large CSV is uploaded through the API
to S3, and how long until the background check has made it ready.

Starts SeaweedFS, gunicorn (one sync worker) and a Celery worker (the default queue, solo pool)
on the PostgreSQL database `factory_saas_bench` and Redis db 5, and uploads a generated CSV two
ways, reading the web worker's peak RSS across each upload and the Celery worker's across each
check (the version is polled until ready):

- in parts (what the SDK does): start an upload in parts, PUT the parts straight to SeaweedFS
  with the SDK's own sender (`factory_sdk.uploads.send_parts`, parts in parallel), finalize;
- in one request (the baseline, as older clients and the dashboard send it): the file as a
  multipart body to `POST .../versions/`, streamed by the client.

Beside them, a second gunicorn whose naive view reads the whole body into memory
(`request.body`), and the store's own ceiling: the same file put into SeaweedFS by boto3's
`upload_file` (parts in parallel), nothing else. Targets for a 200 MB upload: under 100 MB of
growth, at least 50 MB/s from upload start to finalize answered (upload_mb_per_s).

    .venv/bin/python -m bench.upload_memory             # 200 MB; a few minutes
    .venv/bin/python -m bench.upload_memory --mb 5      # smoke check
    .venv/bin/python -m bench.upload_memory --part-mb 16 --threads 8   # another part geometry

MB here is 2**20 bytes. The table goes to stdout, ending with one `RESULT {json}` line; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.databases import ensure_database, migrate

REPO_ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/factory_saas_bench"
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
BUCKET = "factory-saas-bench"
APP_SETTINGS = "factory_saas.settings.test"
NAIVE_SETTINGS = "bench.settings_naive"
TARGET_GROWTH_MB = 100
TARGET_UPLOAD_MB_PER_S = 50
READY_TIMEOUT_S = 600
# Past the 2 MiB that Django keeps in memory and the 8 MiB S3 part, so every code path the big
# upload takes has run once before the base RSS is read.
WARMUP_UPLOAD_MB = 10
SEND_CHUNK = MB
ROWS_PER_BATCH = 20_000
START_TIMEOUT_S = 60
UPLOAD_TIMEOUT_S = 600
CSV_HEADER = "reading_id,recorded_at,line,sensor,value,count,status\n"


@dataclass(frozen=True)
class Web:
    port: int
    worker_pid: int
    log_path: Path


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    seconds: float

    def json(self) -> dict:
        return json.loads(self.body)


@dataclass(frozen=True)
class Measurement:
    boot_kb: int
    base_kb: int
    peak_kb: int
    peak_is_reset: bool
    seconds: float

    @property
    def growth_mb(self) -> float:
        return (self.peak_kb - self.base_kb) / 1024


@dataclass(frozen=True)
class Check:
    """The background check of the big upload: upload start to ready, and the Celery worker's
    memory across it."""

    ready_s: float
    base_kb: int
    peak_kb: int
    peak_is_reset: bool

    @property
    def growth_mb(self) -> float:
        return (self.peak_kb - self.base_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the CSV to upload (MiB)")
    parser.add_argument(
        "--part-mb", type=int, default=0, help="part size (MiB; default: the SDK's PART_BYTES)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="parts in flight (default: the SDK's)"
    )
    args = parser.parse_args()
    if args.mb < 1:
        parser.error("--mb must be at least 1")
    if args.part_mb and args.part_mb < 5:
        parser.error("--part-mb must be at least 5 (S3's smallest part)")
    # A plain `kill` should clean up like Ctrl-C does: gunicorn and SeaweedFS run in their own
    # sessions and would outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from factory_sdk import uploads

    if args.part_mb:
        uploads.PART_BYTES = args.part_mb * MB
    if args.threads:
        uploads.PARALLEL_PARTS = args.threads
    run(size_mb=args.mb)


def run(*, size_mb: int) -> None:
    from tests.s3server import running_s3_server

    with tempfile.TemporaryDirectory(prefix="upload-bench-") as tmp_name:
        tmp = Path(tmp_name)
        csv_path, warm_path = tmp / "readings.csv", tmp / "warmup.csv"
        progress(f"writing a {size_mb} MB CSV in {tmp}")
        rows = write_csv(csv_path, size_bytes=size_mb * MB, seed=1)
        write_csv(warm_path, size_bytes=WARMUP_UPLOAD_MB * MB, seed=2)
        for name in ("seaweed", "web-tmp"):
            (tmp / name).mkdir()
        progress("starting SeaweedFS")
        with running_s3_server(tmp / "seaweed", bucket=BUCKET) as s3:
            env = {
                **os.environ,
                "DJANGO_SETTINGS_MODULE": APP_SETTINGS,
                "DATABASE_URL": DATABASE_URL,
                "REDIS_URL": REDIS_URL,
                "STORAGE_BACKEND": "s3",
                "S3_ENDPOINT_URL": s3.endpoint_url,
                "S3_BUCKET": s3.bucket,
                "S3_REGION": s3.region,
                "S3_ACCESS_KEY_ID": s3.access_key,
                "S3_SECRET_ACCESS_KEY": s3.secret_key,
                # Django's spooled upload files and the service's temporary copies land here,
                # so they go with the temporary directory even if a worker is killed.
                "TMPDIR": str(tmp / "web-tmp"),
            }
            progress(f"preparing {DATABASE_URL}")
            ensure_database(DATABASE_URL)
            migrate(env)
            slug, token = create_tenant(env)
            single, single_check, parts, parts_check = measure_api_upload(
                env, tmp, slug, token, csv_path, warm_path, rows
            )
            naive = measure_naive_upload(env, tmp, csv_path, warm_path)
            store_put_s = measure_store_put(s3, csv_path)
            store_parts_s = measure_store_parts(s3, csv_path)
            size_bytes = csv_path.stat().st_size
    report(
        size_mb=size_mb,
        size_bytes=size_bytes,
        rows=rows,
        parts=parts,
        parts_check=parts_check,
        api=single,
        check=single_check,
        baseline=naive,
        store_put_s=store_put_s,
        store_parts_s=store_parts_s,
    )


# --- the two cases ---------------------------------------------------------------------------


def measure_api_upload(
    env: dict, tmp: Path, slug: str, token: str, csv_path: Path, warm_path: Path, rows: int
) -> tuple[Measurement, Check, Measurement, Check]:
    """The upload in one request, then in parts, to the same web and check workers; each with
    its web growth and its check."""
    auth = {"Authorization": f"Bearer {token}"}
    datasets = f"/api/v1/orgs/{slug}/datasets/"
    versions = f"{datasets}readings/versions/"
    size = csv_path.stat().st_size
    checked: dict[str, int] = {}

    def warm(web: Web) -> None:
        created = request(
            web.port, "POST", datasets, json.dumps({"name": "readings"}).encode(), auth
        )
        expect(created, 201, "creating the dataset")
        warmed = expect(post_file(web.port, versions, warm_path, auth), 201, "the warm-up upload")
        wait_until_ready(web.port, f"{versions}{warmed.json()['number']}/", auth)

    def upload(web: Web) -> Reply:
        # The check starts as soon as the upload commits, so the worker's peak is reset before.
        checked["base_kb"] = memory_kb(checked["worker_pid"])["VmRSS"]
        checked["peak_is_reset"] = reset_peak(checked["worker_pid"])
        done = expect(post_file(web.port, versions, csv_path, auth), 201, "the upload")
        if done.json()["size_bytes"] != size:
            raise SystemExit(f"the API stored {done.json()['size_bytes']} bytes; sent {size}")
        checked["number"] = done.json()["number"]
        return done

    progress("API upload: starting gunicorn and a Celery worker")
    with (
        running_gunicorn(APP_SETTINGS, env, tmp / "gunicorn-app.log") as web,
        running_celery_worker(env, tmp / "celery.log") as worker_pid,
    ):
        checked["worker_pid"] = worker_pid
        measured = measure(web, warm=warm, upload=upload, label="API upload in one request")
        check = wait_for_check(web, versions, auth, measured, checked, size=size, rows=rows)

        def upload_in_parts(web: Web) -> Reply:
            checked["base_kb"] = memory_kb(worker_pid)["VmRSS"]
            checked["peak_is_reset"] = reset_peak(worker_pid)
            done = send_in_parts(web.port, slug, token, csv_path)
            checked["number"] = done.json()["number"]
            return done

        in_parts = measure(web, warm=None, upload=upload_in_parts, label="API upload in parts")
        parts_check = wait_for_check(web, versions, auth, in_parts, checked, size=size, rows=rows)
    return measured, check, in_parts, parts_check


def wait_for_check(
    web: Web, versions: str, auth: dict, measured: Measurement, checked: dict, *, size, rows
) -> Check:
    """Wait for the uploaded version's check; the clock runs from the upload's first byte (the
    upload's own time plus the wait)."""
    waited_from = time.perf_counter()
    version = wait_until_ready(web.port, f"{versions}{checked['number']}/", auth)
    check = Check(
        ready_s=measured.seconds + (time.perf_counter() - waited_from),
        base_kb=checked["base_kb"],
        peak_kb=memory_kb(checked["worker_pid"])["VmHWM"],
        peak_is_reset=bool(checked["peak_is_reset"]),
    )
    if (version["size_bytes"], version["row_count"]) != (size, rows):
        raise SystemExit(
            f"the check recorded {version['size_bytes']} bytes and {version['row_count']} rows; "
            f"sent {size} bytes and {rows} rows"
        )
    progress(f"ready after {check.ready_s:.1f} s")
    return check


def send_in_parts(port: int, slug: str, token: str, csv_path: Path) -> Reply:
    """Start an upload in parts, send them with the SDK's sender, finalize; the finalize's
    answer, timed from the start."""
    from factory_sdk import uploads
    from factory_sdk.client import Client

    size = csv_path.stat().st_size
    progress(f"parts of {uploads.PART_BYTES // MB} MiB, {uploads.PARALLEL_PARTS} in flight")
    with Client(f"http://127.0.0.1:{port}", token, org=slug, timeout=UPLOAD_TIMEOUT_S) as client:
        start = time.perf_counter()
        started = client.upload_start(
            "readings",
            filename=csv_path.name,
            size_bytes=size,
            parts=True,
            part_size_bytes=uploads.PART_BYTES,
        )
        if not started.get("part_count"):
            raise SystemExit(f"the server offered no parts: {started}")
        uploads.send_parts(client, "readings", started, csv_path, None)
        version = client.upload_finalize("readings", started["id"])
        seconds = time.perf_counter() - start
    if version["size_bytes"] != size:
        raise SystemExit(f"the API recorded {version['size_bytes']} bytes; sent {size}")
    return Reply(201, json.dumps(version).encode(), seconds)


def wait_until_ready(port: int, target: str, auth: dict) -> dict:
    """Poll a dataset version until its check has decided; the version, once ready."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        version = expect(request(port, "GET", target, headers=auth), 200, "reading the version")
        state = version.json()["state"]
        if state == "ready":
            return version.json()
        if state != "checking":
            raise SystemExit(f"the check rejected the upload: {version.json()['rejection_reason']}")
        time.sleep(0.1)
    raise SystemExit(f"the upload was not checked within {READY_TIMEOUT_S}s")


def measure_store_put(s3, csv_path: Path) -> float:
    """Seconds for boto3 alone to put the file into the same store: what any upload to it,
    ours included, cannot beat on this machine."""
    progress("store ceiling: boto3 upload_file")
    started = time.perf_counter()
    s3.client().upload_file(str(csv_path), s3.bucket, "bench/store-ceiling.csv")
    return time.perf_counter() - started


def measure_store_parts(s3, csv_path: Path) -> float:
    """Seconds for the parts path with no API around it: a multipart upload started by boto3,
    its parts PUT to presigned URLs by the SDK's sender (same geometry, same threads), then
    completed. What the upload in parts cannot beat on this machine."""
    from factory_sdk import uploads
    from factory_sdk.client import Client

    progress("store ceiling in parts: presigned part PUTs, no API")
    client = s3.client()
    size = csv_path.stat().st_size
    key = "bench/store-parts.csv"
    started = time.perf_counter()
    upload_id = client.create_multipart_upload(Bucket=s3.bucket, Key=key)["UploadId"]
    part_size = uploads.PART_BYTES
    count = -(-size // part_size)
    parts = [
        {
            "number": number,
            "size_bytes": min(part_size, size - (number - 1) * part_size),
            "url": client.generate_presigned_url(
                "upload_part",
                Params={
                    "Bucket": s3.bucket,
                    "Key": key,
                    "UploadId": upload_id,
                    "PartNumber": number,
                    "ContentLength": min(part_size, size - (number - 1) * part_size),
                },
                ExpiresIn=600,
            ),
        }
        for number in range(1, count + 1)
    ]

    class Direct(Client):
        """The SDK's client with the part URLs already in hand: no API call at all."""

        def upload_parts(self, dataset, upload_id):
            return {"missing": list(range(1, count + 1))}

        def upload_part_urls(self, dataset, upload_id, numbers):
            return [parts[number - 1] for number in numbers]

    with Direct("http://127.0.0.1:9", "", org="bench", timeout=UPLOAD_TIMEOUT_S) as direct:
        upload = {"id": 0, "size_bytes": size, "part_size_bytes": part_size}
        uploads.send_parts(direct, "", upload, csv_path, None)
    held = client.list_parts(Bucket=s3.bucket, Key=key, UploadId=upload_id, MaxParts=1000)
    client.complete_multipart_upload(
        Bucket=s3.bucket,
        Key=key,
        UploadId=upload_id,
        MultipartUpload={
            "Parts": [{"PartNumber": p["PartNumber"], "ETag": p["ETag"]} for p in held["Parts"]]
        },
    )
    return time.perf_counter() - started


def measure_naive_upload(env: dict, tmp: Path, csv_path: Path, warm_path: Path) -> Measurement:
    target = "/bench/naive-upload"
    size = csv_path.stat().st_size

    def warm(web: Web) -> None:
        expect(post_file(web.port, target, warm_path, {}), 200, "the naive warm-up upload")

    def upload(web: Web) -> Reply:
        done = expect(post_file(web.port, target, csv_path, {}), 200, "the naive upload")
        if done.json()["bytes"] < size:
            raise SystemExit(f"the naive view read {done.json()['bytes']} bytes of {size}")
        return done

    progress("naive baseline: starting gunicorn")
    with running_gunicorn(NAIVE_SETTINGS, env, tmp / "gunicorn-naive.log") as web:
        return measure(web, warm=warm, upload=upload, label="naive upload")


def measure(
    web: Web, *, warm: Callable[[Web], None] | None, upload: Callable[[Web], Reply], label: str
) -> Measurement:
    """Base RSS after a warm-up (none when an earlier measure warmed the worker), then the peak
    RSS across one upload."""
    boot_kb = memory_kb(web.worker_pid)["VmRSS"]
    if warm is not None:
        for _ in range(3):
            expect(request(web.port, "GET", "/healthz"), 200, "GET /healthz")
        warm(web)
    base_kb = memory_kb(web.worker_pid)["VmRSS"]
    peak_is_reset = reset_peak(web.worker_pid)
    progress(f"{label}: sending")
    done = upload(web)
    peak_kb = memory_kb(web.worker_pid)["VmHWM"]
    progress(f"{label}: {done.seconds:.1f} s, peak {peak_kb / 1024:.1f} MB")
    return Measurement(
        boot_kb=boot_kb,
        base_kb=base_kb,
        peak_kb=peak_kb,
        peak_is_reset=peak_is_reset,
        seconds=done.seconds,
    )


# --- setup -----------------------------------------------------------------------------------


def write_csv(path: Path, *, size_bytes: int, seed: int) -> int:
    """Write rows of mixed columns, a batch at a time, until the file reaches `size_bytes`;
    returns the number of data rows."""
    rng = random.Random(seed)  # noqa: S311 (test data, seeded to be the same every run)
    lines = [f"line-{n}" for n in range(12)]
    sensors = [f"sensor-{n:04d}" for n in range(5000)]
    statuses = ("ok", "ok", "ok", "warn", "fault", "idle")
    rows = written = 0
    with path.open("w", encoding="ascii", newline="") as out:
        written += out.write(CSV_HEADER)
        while written < size_bytes:
            text = "".join(
                f"{n},2025-{1 + n // 2_419_200 % 12:02d}-{1 + n // 86_400 % 28:02d}T"
                f"{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d},"
                f"{rng.choice(lines)},{rng.choice(sensors)},"
                f"{'' if rng.random() < 0.01 else f'{rng.gauss(20, 5):.4f}'},"
                f"{rng.randrange(1000)},{rng.choice(statuses)}\n"
                for n in range(rows, rows + ROWS_PER_BATCH)
            )
            remaining = size_bytes - written
            if len(text) > remaining:
                # Stop at the end of the row that reaches the size.
                text = text[: text.index("\n", remaining - 1) + 1]
            written += out.write(text)
            rows += text.count("\n")
    return rows


def create_tenant(env: dict) -> tuple[str, str]:
    """A fresh organization with an API key that may write datasets; returns its slug and key."""
    os.environ.update(env)
    import django

    django.setup()
    from tenants.actors import Actor
    from tenants.models import User
    from tenants.services import api_key_create, organization_create

    suffix = secrets.token_hex(4)
    user = User.objects.create_user(email=f"upload-bench-{suffix}@example.com")
    actor = Actor(user=user)
    organization = organization_create(name=f"Upload bench {suffix}", owner=user, actor=actor)
    _, token = api_key_create(
        organization=organization,
        name="upload bench",
        scopes=["datasets:read", "datasets:write"],
        actor=actor,
    )
    return organization.slug, token


@contextlib.contextmanager
def running_gunicorn(settings_module: str, env: dict, log_path: Path) -> Iterator[Web]:
    from tests.s3server import _free_ports

    port = _free_ports(1)[0]
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "factory_saas.wsgi:application",
        "--workers=1",
        "--worker-class=sync",
        "--timeout=300",
        f"--bind=127.0.0.1:{port}",
        f"--chdir={REPO_ROOT}",
    ]
    with log_path.open("wb") as log:
        master = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**env, "DJANGO_SETTINGS_MODULE": settings_module},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if master.poll() is not None:
                raise SystemExit(f"gunicorn exited with {master.returncode}:\n{tail(log_path)}")
            with contextlib.suppress(OSError):
                if request(port, "GET", "/healthz").status == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"gunicorn not up in {START_TIMEOUT_S}s:\n{tail(log_path)}")
            time.sleep(0.1)
        workers = children_of(master.pid)
        if len(workers) != 1:
            raise SystemExit(f"expected one gunicorn worker, found {workers}")
        web = Web(port=port, worker_pid=workers[0], log_path=log_path)
        yield web
        if children_of(master.pid) != workers:
            raise SystemExit(
                f"the gunicorn worker was replaced mid-run, so its peak is lost:\n{tail(log_path)}"
            )
    finally:
        stop(master)


@contextlib.contextmanager
def running_celery_worker(env: dict, log_path: Path) -> Iterator[int]:
    """A Celery worker on the default queue (where the outbox and the check run), in one
    process (solo pool) so its peak RSS is the check's; yields its pid."""
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "factory_saas",
        "worker",
        "-Q",
        "default",
        "--pool=solo",
        "-l",
        "warning",
        "-n",
        f"upload-bench-{secrets.token_hex(3)}@%h",
    ]
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield worker.pid
        if worker.poll() is not None:
            raise SystemExit(f"the Celery worker exited mid-run:\n{tail(log_path)}")
    finally:
        stop(worker)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


# --- HTTP --------------------------------------------------------------------------------------


def request(
    port: int, method: str, target: str, body: bytes | None = None, headers: dict | None = None
) -> Reply:
    headers = {**(headers or {})}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    try:
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, response.read(), time.perf_counter() - start)
    finally:
        conn.close()


def post_file(port: int, target: str, path: Path, headers: dict) -> Reply:
    """POST `path` as the multipart field `file`, streamed from disk with a declared length, so
    neither side of the socket needs the whole file in memory."""
    boundary = "bench" + secrets.token_hex(16)
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    foot = f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=UPLOAD_TIMEOUT_S)
    start = time.perf_counter()
    try:
        conn.putrequest("POST", target)
        for name, value in {
            **headers,
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + path.stat().st_size + len(foot)),
        }.items():
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(head)
        with path.open("rb") as stream:
            while chunk := stream.read(SEND_CHUNK):
                conn.send(chunk)
        conn.send(foot)
        response = conn.getresponse()
        return Reply(response.status, response.read(), time.perf_counter() - start)
    finally:
        conn.close()


def expect(response: Reply, status: int, what: str) -> Reply:
    if response.status != status:
        raise SystemExit(f"{what}: HTTP {response.status}, not {status}: {response.body[:2000]!r}")
    return response


# --- /proc -------------------------------------------------------------------------------------


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the peak of VmRSS) of a process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+), so the peak read later is the upload's alone
    and not the warm-up's; False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name in brackets may hold spaces; the parent pid follows it.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)


# --- output ------------------------------------------------------------------------------------


def report(
    *,
    size_mb: int,
    size_bytes: int,
    rows: int,
    parts: Measurement,
    parts_check: Check,
    api: Measurement,
    check: Check,
    baseline: Measurement,
    store_put_s: float,
    store_parts_s: float,
) -> None:
    from factory_sdk import uploads

    client_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def mb(kb: int) -> str:
        return f"{kb / 1024:.1f} MB"

    def rate(seconds: float) -> str:
        return f"{seconds:.1f} s ({size_bytes / MB / seconds:.1f} MB/s)"

    table = [
        ("", "in parts (ours)", "one request (old)", "naive request.body"),
        ("worker RSS after boot", mb(parts.boot_kb), mb(api.boot_kb), mb(baseline.boot_kb)),
        ("worker RSS warmed (base)", mb(parts.base_kb), mb(api.base_kb), mb(baseline.base_kb)),
        ("worker peak RSS (VmHWM)", mb(parts.peak_kb), mb(api.peak_kb), mb(baseline.peak_kb)),
        (
            "growth (peak - base)",
            f"{parts.growth_mb:.1f} MB",
            f"{api.growth_mb:.1f} MB",
            f"{baseline.growth_mb:.1f} MB",
        ),
        ("upload wall time", rate(parts.seconds), rate(api.seconds), rate(baseline.seconds)),
        ("upload start -> ready", rate(parts_check.ready_s), rate(check.ready_s), "-"),
        ("S3 put alone (ceiling)", rate(store_put_s), "-", "-"),
        ("S3 parts alone (ceiling)", rate(store_parts_s), "-", "-"),
        (
            "check worker growth",
            f"{parts_check.growth_mb:.1f} MB (peak {mb(parts_check.peak_kb)})",
            f"{check.growth_mb:.1f} MB (peak {mb(check.peak_kb)})",
            "-",
        ),
    ]
    print(
        f"Upload memory: {size_mb} MB CSV ({size_bytes:,} bytes, {rows:,} rows) to S3 "
        f"(SeaweedFS); in parts of {uploads.PART_BYTES // MB} MiB, {uploads.PARALLEL_PARTS} in "
        "flight, vs one POST .../datasets/<name>/versions/; gunicorn, 1 sync worker"
    )
    print()
    for label, ours, old, naive in table:
        print(f"  {label:<26}{ours:>26}  {old:>26}  {naive:>24}")
    print()
    ratio = parts.growth_mb / baseline.growth_mb if baseline.growth_mb > 0 else float("nan")
    verdict = "met" if parts.growth_mb < TARGET_GROWTH_MB else "MISSED"
    upload_mb_per_s = size_bytes / MB / parts.seconds
    speed_verdict = "met" if upload_mb_per_s >= TARGET_UPLOAD_MB_PER_S else "MISSED"
    print(f"  growth ours / naive: {ratio:.2f}")
    print(f"  in parts / one request: {api.seconds / parts.seconds:.2f}x as fast")
    print(f"  target growth < {TARGET_GROWTH_MB} MB: {verdict}")
    print(f"  target upload >= {TARGET_UPLOAD_MB_PER_S} MB/s: {speed_verdict}")
    print(f"  load average after the run: {os.getloadavg()[0]:.2f}")
    print(f"  bench client peak RSS: {client_peak_mb:.1f} MB (the whole bench process)")
    if not all(m.peak_is_reset for m in (parts, api, baseline, parts_check, check)):
        print("  note: VmHWM could not be reset, so a peak may be the warm-up's")
    result = {
        "upload_mb": size_mb,
        "part_mb": uploads.PART_BYTES // MB,
        "parts_in_flight": uploads.PARALLEL_PARTS,
        "rss_growth_mb": round(parts.growth_mb, 1),
        "baseline_rss_growth_mb": round(baseline.growth_mb, 1),
        "upload_s": round(parts.seconds, 1),
        "upload_mb_per_s": round(upload_mb_per_s, 1),
        "ready_s": round(parts_check.ready_s, 1),
        "check_rss_growth_mb": round(parts_check.growth_mb, 1),
        "single_request_rss_growth_mb": round(api.growth_mb, 1),
        "single_request_s": round(api.seconds, 1),
        "single_request_mb_per_s": round(size_bytes / MB / api.seconds, 1),
        "single_request_ready_s": round(check.ready_s, 1),
        "single_request_check_rss_growth_mb": round(check.growth_mb, 1),
        "store_put_mb_per_s": round(size_bytes / MB / store_put_s, 1),
        "store_parts_mb_per_s": round(size_bytes / MB / store_parts_s, 1),
        "load_average": round(os.getloadavg()[0], 2),
    }
    print(f"RESULT {json.dumps(result)}")


def progress(message: str) -> None:
    print(f"[upload_memory] {message}", file=sys.stderr, flush=True)


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    main()
