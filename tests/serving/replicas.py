"""A real HTTP server that keeps the replica contract (jobs/services/replicas.py), for tests of
the request path: it checks the bearer token of its job's attempt and answers each input with a
label naming itself, so a test sees which replica (and so which version) answered."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from django.utils import timezone

from jobs.models import Job, JobState
from jobs.services.replicas import replica_token
from serving.models import Replica
from tests.factories import JobFactory
from tests.processes import SERVER_POLL_S


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a caller that gave up (a timeout test) closed the socket: not the test's failure


class FakeReplica:
    def __init__(
        self,
        name: str,
        *,
        status: int = 200,
        hold: threading.Event | None = None,
        barrier: threading.Barrier | None = None,
    ):
        self.name = name
        self.status = status
        self.hold = hold  # answers wait until it is set (a slow model)
        self.barrier = barrier  # answers wait until that many requests arrived
        self.token = ""
        self.requests: list[list] = []
        self.unauthorized = 0
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(SERVER_POLL_S,), daemon=True
        )

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> FakeReplica:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        replica = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # else each answer waits for a delayed ACK

            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/healthz" and replica.status == 200:
                    self._send(200, {"status": "ready", "in_flight": 0})
                else:
                    self._send(503, {"status": "broken"})

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.headers.get("Authorization") != f"Bearer {replica.token}":
                    replica.unauthorized += 1
                    self._send(401, {"detail": "bad token"})
                    return
                inputs = body.get("inputs", [])
                replica.requests.append(inputs)
                if replica.hold is not None:
                    replica.hold.wait(10)
                if replica.barrier is not None:
                    replica.barrier.wait()
                if replica.status == 400:
                    self._send(400, {"detail": "column x is missing"})
                elif replica.status != 200:
                    self._send(replica.status, {"detail": "boom"})
                else:
                    outputs = [
                        {"label": replica.name, "probabilities": {replica.name: 1.0}}
                        for _ in inputs
                    ]
                    self._send(200, {"outputs": outputs})

        return Handler


def ready_replica(deployment, version, fake: FakeReplica) -> Replica:
    """A running serve job answering at `fake`, and its READY replica row."""
    job = JobFactory(
        organization=deployment.organization,
        kind=Job.Kind.SERVE,
        state=JobState.RUNNING,
        attempt=1,
        serve_address=fake.address,
        serve_ready_at=timezone.now(),
    )
    fake.token = replica_token(job.pk, job.attempt)
    return Replica.objects.create(
        organization=deployment.organization,
        deployment=deployment,
        model_version=version,
        job=job,
        state=Replica.State.READY,
        ready_at=timezone.now(),
    )
