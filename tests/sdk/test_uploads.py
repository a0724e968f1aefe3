"""`factory datasets upload` against a live server: the three-step upload, and a dropped
connection continued by running the command again."""

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import threading
from urllib.parse import urlsplit

import pytest
from django.test import override_settings
from factory_sdk.client import Client
from factory_sdk.uploads import UploadInterrupted, upload_dataset

from registry.models import DatasetVersion, PendingUpload
from registry.storage import get_storage
from tests.processes import wait_for
from tests.registry.conftest import check_uploads
from tests.sdk.conftest import live

pytestmark = live
MIB = 1024 * 1024


class DroppingProxy:
    """A TCP proxy in front of the live server (or the S3 server) that, while `cut_after` is
    set, drops each connection once that many bytes of its requests have passed: a connection
    lost mid-upload. It counts the part PUTs it relays (requests starting `part_put`), whole or
    cut."""

    def __init__(self, upstream_port: int, *, part_put: bytes = b"PUT /storage/local/") -> None:
        self.upstream_port = upstream_port
        self.part_put = part_put
        self.cut_after: int | None = None
        self.cuts = 0
        self.part_puts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(downstream,), daemon=True).start()

    def _relay(self, downstream: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        answers = threading.Thread(target=self._pump, args=(upstream, downstream), daemon=True)
        answers.start()
        self._pump(downstream, upstream, limit=self.cut_after, requests=True)

    def _pump(
        self,
        source: socket.socket,
        target: socket.socket,
        limit: int | None = None,
        requests: bool = False,
    ):
        passed = 0
        # A request line may straddle two reads; the CSV bodies never contain one.
        tail = b""
        try:
            while data := source.recv(65536):
                if requests:
                    seen = tail + data
                    with self._lock:
                        self.part_puts += seen.count(self.part_put) - tail.count(self.part_put)
                    tail = seen[-len(self.part_put) :]
                if limit is not None and passed + len(data) > limit:
                    with self._lock:
                        self.cuts += 1
                    break
                target.sendall(data)
                passed += len(data)
        except OSError:
            pass
        finally:
            # shutdown, not only close: the other pump's recv on the same socket would keep it
            # open, and the server would wait for the rest of the body.
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()


@pytest.fixture
def proxy(server, settings):
    """Upload URLs point at the proxy; API calls go straight to the live server."""
    dropping = DroppingProxy(urlsplit(server).port)
    settings.SITE_URL = dropping.url
    yield dropping
    dropping.close()


@pytest.fixture
def big_csv(tmp_path):
    """About 600 KB of CSV: several of the chunks a multipart body is streamed in."""
    path = tmp_path / "churn.csv"
    rows = "".join(f"{n},{n % 7},{'yes' if n % 3 else 'no'}\n" for n in range(40_000))
    path.write_text("id,plan,churned\n" + rows)
    return path


def test_upload_makes_the_next_version_with_the_files_sha256(cli, org, big_csv):
    done = cli("datasets", "upload", big_csv, "--name", "churn", "--json")

    assert done.exit_code == 0, done.output
    answer = json.loads(done.stdout)
    assert (answer["dataset"], answer["resumed"]) == ("churn", False)
    assert (answer["version"]["number"], answer["version"]["state"]) == (1, "checking")
    [checked] = check_uploads()
    assert (checked.state, checked.row_count) == ("ready", 40_000)
    assert checked.sha256 == hashlib.sha256(big_csv.read_bytes()).hexdigest() == answer["sha256"]
    assert not PendingUpload.objects.exists()


def test_a_dropped_upload_continues_the_same_upload_when_run_again(cli, proxy, org, big_csv):
    proxy.cut_after = 200_000

    dropped = cli("datasets", "upload", big_csv, "--name", "churn", "--json")

    assert dropped.exit_code == 1, dropped.output
    assert json.loads(dropped.stderr)["code"] == "upload_interrupted"
    assert proxy.cuts == 1
    [pending] = PendingUpload.objects.all()
    assert not DatasetVersion.objects.exists()
    proxy.cut_after = None

    done = cli("datasets", "upload", big_csv, "--name", "churn", "--json")

    assert done.exit_code == 0, done.output
    answer = json.loads(done.stdout)
    assert (answer["upload_id"], answer["resumed"]) == (pending.pk, True)
    assert not PendingUpload.objects.exists()
    [checked] = check_uploads()
    assert (checked.number, checked.state, checked.row_count) == (1, "ready", 40_000)
    assert checked.sha256 == hashlib.sha256(big_csv.read_bytes()).hexdigest()


def test_a_resumed_upload_sends_only_the_parts_storage_lacks(
    cli, proxy, org, big_csv, settings, monkeypatch
):
    """Parts of 64 KiB, four at a time; each connection is cut once 100 kB of it have passed,
    so each thread's second part is lost. The second run asks which parts storage holds and
    PUTs only the others. Before parts, it sent the whole file again."""
    settings.DATASET_UPLOAD_PART_MIN_BYTES = 64 * 1024
    monkeypatch.setattr("factory_sdk.uploads.PART_BYTES", 64 * 1024)
    part_count = -(-big_csv.stat().st_size // (64 * 1024))
    proxy.cut_after = 100_000

    dropped = cli("datasets", "upload", big_csv, "--name", "churn", "--json")

    assert dropped.exit_code == 1, dropped.output
    assert json.loads(dropped.stderr)["code"] == "upload_interrupted"
    [pending] = PendingUpload.objects.all()
    held = get_storage().multipart_parts(pending.storage_key, upload_id=pending.multipart_upload_id)
    assert 0 < len(held) < part_count
    assert not DatasetVersion.objects.exists()
    proxy.cut_after = None
    proxy.part_puts = 0

    done = cli("datasets", "upload", big_csv, "--name", "churn", "--json")

    assert done.exit_code == 0, done.output
    assert (json.loads(done.stdout)["upload_id"], json.loads(done.stdout)["resumed"]) == (
        pending.pk,
        True,
    )
    assert proxy.part_puts == part_count - len(held)
    [checked] = check_uploads()
    assert (checked.state, checked.row_count) == ("ready", 40_000)
    assert checked.sha256 == hashlib.sha256(big_csv.read_bytes()).hexdigest()
    assert list(get_storage().multipart_uploads(f"orgs/{org.pk}/")) == []


def _csv_of(path, size: int) -> None:
    rows = "".join(f"{n},{n % 7},{'yes' if n % 3 else 'no'}\n" for n in range(size // 10))
    path.write_text("id,plan,churned\n" + rows[: size - 16 - 1].rpartition("\n")[0] + "\n")


def test_an_upload_to_s3_resumes_with_the_parts_the_store_lacks(
    s3_server, s3_storage, live_server, api_key, tmp_path, monkeypatch
):
    """The same resume against the real S3 server, its 5 MiB smallest part and its own
    multipart uploads: the proxy stands in front of SeaweedFS, so the part URLs the server signs
    point at it, and cuts each connection in its second part."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("factory_sdk.uploads.PART_BYTES", 5 * MIB)
    monkeypatch.setattr("factory_sdk.uploads.PARALLEL_PARTS", 2)
    path = tmp_path / "churn.csv"
    _csv_of(path, 16 * MIB)
    part_count = -(-path.stat().st_size // (5 * MIB))
    store = DroppingProxy(
        urlsplit(s3_server.endpoint_url).port, part_put=f"PUT /{s3_server.bucket}/".encode()
    )
    try:
        with override_settings(S3_ENDPOINT_URL=store.url):
            store.cut_after = 8 * MIB
            with Client(live_server.url, api_key) as sdk, pytest.raises(UploadInterrupted):
                upload_dataset(sdk, path, dataset="churn")
            [pending] = PendingUpload.objects.all()
            held = get_storage().multipart_parts(
                pending.storage_key, upload_id=pending.multipart_upload_id
            )
            store.cut_after = None
            store.part_puts = 0

            # A second run: a fresh client, as a second command is.
            with Client(live_server.url, api_key) as sdk:
                result = upload_dataset(sdk, path, dataset="churn")
    finally:
        store.close()

    assert 0 < len(held) < part_count == 4
    assert (result.upload_id, result.resumed) == (pending.pk, True)
    assert store.part_puts == part_count - len(held)
    [checked] = check_uploads()
    assert (checked.state, checked.size_bytes) == ("ready", path.stat().st_size)
    assert checked.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_wait_answers_once_the_check_has_made_the_version_ready(factory_env, org, big_csv):
    env = {name: value for name, value in factory_env.items() if value is not None}
    command = [sys.executable, "-m", "factory_sdk", "datasets", "upload", big_csv]
    command += ["--name", "churn", "--wait", "--poll-interval", "0.1", "--json"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(
            lambda: DatasetVersion.objects.filter(state="checking").exists(),
            timeout=30,
            what="the finalized upload",
        )
        check_uploads()  # what the worker the outbox sends the check to does
        out, _ = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 0
    version = json.loads(out)["version"]
    assert (version["state"], version["row_count"]) == ("ready", 40_000)


def test_an_unreachable_server_is_one_clear_error(cli, factory_env, org, big_csv):
    factory_env["FACTORY_URL"] = "http://127.0.0.1:9"  # nothing listens on the discard port

    refused = cli("datasets", "upload", big_csv, "--name", "churn", "--json")

    assert refused.exit_code == 1
    assert json.loads(refused.stderr)["code"] == "connection_error"
