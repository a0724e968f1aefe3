"""The replica's ASGI app in-process (the pool test drives it over real HTTP): what it refuses
before a model sees a request, and that a model's bug answers a 500 that shows no code."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import pytest

from jobs.recipes.base import RecipeInputError
from jobs.runner.serve import ReplicaApp, listening_socket

TOKEN = "t" * 64
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _echo(inputs: list) -> list[dict]:
    if any(item == "bad" for item in inputs):
        raise RecipeInputError("inputs[0] is bad.")
    if any(item == "bug" for item in inputs):
        raise KeyError("weights.secret_layer")
    if any(item == "nan" for item in inputs):
        return [{"forecast": [float("nan")]}]
    return [{"label": str(item), "probabilities": {str(item): 1.0}} for item in inputs]


def _call(method: str, path: str, *, body: bytes = b"", headers=None) -> httpx.Response:
    app = ReplicaApp(_echo, token=TOKEN, max_items=3, max_body_bytes=200)

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica") as client:
            return await client.request(method, path, content=body, headers=headers or {})

    return asyncio.run(go())


def test_a_request_with_the_token_is_answered_in_order():
    answered = _call("POST", "/predict", body=b'{"inputs": [1, 2]}', headers=AUTH)
    assert answered.status_code == 200
    assert [output["label"] for output in answered.json()["outputs"]] == ["1", "2"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"bearer {TOKEN}"},
        [("Authorization", "Bearer x"), ("Authorization", f"Bearer {TOKEN}")],
    ],
)
def test_anything_but_the_exact_bearer_token_is_401_before_the_body_is_read(headers):
    refused = _call("POST", "/predict", body=b"x" * 10_000, headers=headers)
    assert refused.status_code == 401 and refused.json() == {
        "detail": "A valid bearer token is required."
    }


def test_bodies_and_batches_over_the_limits_are_413():
    big = json.dumps({"inputs": ["a" * 300]}).encode()
    assert _call("POST", "/predict", body=big, headers=AUTH).status_code == 413
    many = _call("POST", "/predict", body=b'{"inputs": [1, 2, 3, 4]}', headers=AUTH)
    assert many.status_code == 413 and "at most 3" in many.json()["detail"]


def test_a_models_complaint_is_400_and_its_bug_a_500_that_shows_no_code(capsys):
    bad = _call("POST", "/predict", body=b'{"inputs": ["bad"]}', headers=AUTH)
    assert bad.status_code == 400 and bad.json() == {"detail": "inputs[0] is bad."}
    bug = _call("POST", "/predict", body=b'{"inputs": ["bug"]}', headers=AUTH)
    assert bug.status_code == 500
    assert bug.json() == {"detail": "The model failed to answer these inputs."}
    assert "secret_layer" not in bug.text and "secret_layer" in capsys.readouterr().err
    unsendable = _call("POST", "/predict", body=b'{"inputs": ["nan"]}', headers=AUTH)
    assert unsendable.status_code == 500 and "detail" in unsendable.json()


def test_health_and_unknown_routes():
    assert _call("GET", "/healthz").json() == {"status": "ready", "in_flight": 0}
    assert _call("GET", "/predict", headers=AUTH).status_code == 405
    assert _call("GET", "/admin").status_code == 404


def test_answers_are_sent_without_waiting_for_the_clients_delayed_ack():
    """Without TCP_NODELAY on what the server accepts, each answer waits 40 ms (Nagle's
    algorithm against the client's delayed ACK): bench/serving.py measured it."""
    listener = listening_socket("127.0.0.1")
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        for sock in (accepted, client, listener):
            sock.close()
