"""A replica's HTTP server, run by the job's child for spec task "serve": the recipe's online
predictor behind a minimal ASGI app (no web framework) on uvicorn. For an own-code replica the
worker runs the same server in a thread of its own, its predictor forwarding each request to the
package in its sandbox (jobs.runner.code.SandboxPredictor), which has no network to serve from.

The web is the only client (jobs/services/replicas.py has the contract): `POST /predict` with the
attempt's bearer token and `{"inputs": [...]}`, `GET /healthz`. Everything a request carries is
the tenant's and hostile: the token is compared in constant time before the body is read, the
body and the number of inputs are bounded, JSON must be plain (no NaN), and a model's complaint
about an input is a 400 in its own words; any other error is a 500 whose detail says nothing of
the code (the traceback goes to stderr, the job's log). No Django here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jobs.recipes.base import OnlinePredictor, RecipeInputError
from jobs.runner.protocol import EXIT_STOPPED, format_line

JSON_HEADERS = [(b"content-type", b"application/json")]
KEEP_ALIVE_S = 75


class _Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class ReplicaApp:
    """The ASGI app: one predictor, called from one thread at a time (a model answers one batch
    at a time faster than several interleaved), off the event loop so /healthz stays quick."""

    def __init__(
        self, predictor: OnlinePredictor, *, token: str, max_items: int, max_body_bytes: int
    ):
        self.predictor = predictor
        self.token = f"Bearer {token}".encode()
        self.max_items, self.max_body_bytes = max_items, max_body_bytes
        self.in_flight = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="predict")

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] == "/healthz" and scope["method"] in ("GET", "HEAD"):
            await _answer(send, 200, {"status": "ready", "in_flight": self.in_flight})
            return
        if scope["path"] != "/predict":
            await _answer(send, 404, {"detail": "Not found."})
            return
        if scope["method"] != "POST":
            await _answer(send, 405, {"detail": "Use POST."})
            return
        self.in_flight += 1
        try:
            status, body = await self._predict(scope, receive)
        finally:
            self.in_flight -= 1
        await _answer(send, status, body)

    async def _predict(self, scope: dict, receive) -> tuple[int, dict]:
        if not self._authorized(scope):
            return 401, {"detail": "A valid bearer token is required."}
        try:
            inputs = _inputs(await self._body(scope, receive), self.max_items)
        except _Refused as refused:
            return refused.status, {"detail": refused.detail}
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self.executor, self.predictor, inputs)
            json.dumps(outputs, allow_nan=False)  # what cannot be sent is the model's failure
        except RecipeInputError as exc:
            return 400, {"detail": str(exc)}
        except Exception:
            traceback.print_exc()
            return 500, {"detail": "The model failed to answer these inputs."}
        return 200, {"outputs": outputs}

    def _authorized(self, scope: dict) -> bool:
        given = [value for name, value in scope["headers"] if name == b"authorization"]
        return len(given) == 1 and hmac.compare_digest(given[0], self.token)

    async def _body(self, scope: dict, receive) -> bytes:
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _Refused(413, f"The body is over {self.max_body_bytes:,} bytes.")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(400, "The client went away.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _Refused(413, f"The body is over {self.max_body_bytes:,} bytes.")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.executor.shutdown(wait=True)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _inputs(body: bytes, max_items: int) -> list[Any]:
    try:
        request = json.loads(
            body, parse_constant=_refuse_constant, parse_float=_finite, parse_int=_bounded_int
        )
    except (ValueError, RecursionError) as exc:
        raise _Refused(400, 'The body must be JSON: {"inputs": [...]}.') from exc
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise _Refused(400, 'The body must be a JSON object with a list "inputs".')
    inputs = request["inputs"]
    if len(inputs) > max_items:
        raise _Refused(413, f"{len(inputs)} inputs; send at most {max_items} per request.")
    return inputs


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _bounded_int(text: str) -> int:
    # Past this a whole number no longer converts to a float, which every model reads.
    if len(text.lstrip("-")) > 300:
        raise ValueError("number out of range")
    return int(text)


async def _answer(send, status: int, body: dict) -> None:
    payload = json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
    headers = [*JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def listening_socket(host: str) -> socket.socket:
    """A socket on a free port of `host` whose accepted connections send without delay.

    Linux hands TCP_NODELAY down to accepted sockets. asyncio sets it itself only on sockets
    made with proto IPPROTO_TCP, which create_server's are not; without it each answer's body
    waits for the client's delayed ACK of its headers, 40 ms a request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


def _print_serving(port: int) -> None:
    print(format_line("serving", {"port": port}), flush=True)


def serve(
    predictor: OnlinePredictor,
    options: dict[str, Any],
    stop: threading.Event,
    *,
    on_serving: Callable[[int], None] = _print_serving,
) -> int:
    """Answer on a free port of `options["host"]` until SIGTERM or `stop`, then drain;
    EXIT_STOPPED.

    The socket is bound here, so its port is known before uvicorn starts; `on_serving(port)`
    (by default: print @@serving) is called once uvicorn accepts connections on it. `stop` is
    the child's own SIGTERM flag, for a signal that came before uvicorn took SIGTERM over, or
    the stop of a server a worker runs in one of its threads (an own-code replica's, which
    takes no signal)."""
    import uvicorn

    listener = listening_socket(options["host"])
    port = listener.getsockname()[1]
    app = ReplicaApp(
        predictor,
        token=options["token"],
        max_items=options["max_items"],
        max_body_bytes=options["max_body_bytes"],
    )
    config = uvicorn.Config(
        app,
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=max(1, math.ceil(options["drain_s"])),
        # Longer than a client pool keeps an idle connection (httpx: 5 s), so the client closes
        # first and never sends a request down a connection the replica just closed.
        timeout_keep_alive=KEEP_ALIVE_S,
        # The parent is the supervisor; uvicorn must not fork or reload.
        workers=None,
        reload=False,
    )

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if stop.is_set():
                self.should_exit = True
            if not self.should_exit:
                on_serving(port)

        async def on_tick(self, counter: int) -> bool:
            return stop.is_set() or await super().on_tick(counter)

    _Server(config).run(sockets=[listener])
    sys.stdout.flush()
    return EXIT_STOPPED
