"""Frames between a serving replica's trusted parent and the package's predict entry in its
sandbox, over the socket pair the parent hands the sandbox (the sandbox has no network at all).

A frame is a 4-byte big-endian length and that many bytes of JSON. The parent sends
`{"inputs": [...]}`; the package answers `{"outputs": [...]}`, one per input, or
`{"error": "...", "bad_input": true|false}`. Once its model is loaded it sends `{"ready": true}`.
Either side reads a frame only up to the length it accepts: the parent reads the package's frames
as it reads anything the package writes, as hostile.

Standard library only: the sandbox's interpreter imports it (factory_job), and so does the worker.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

_LENGTH = struct.Struct(">I")
# The fd number the sandbox's end arrives at is given in this variable.
FD_ENV = "FACTORY_JOB_CHANNEL_FD"


class FrameRefused(Exception):
    """A frame the reader does not accept: too long, cut short, or not plain JSON."""


def dumps(value: Any) -> str:
    """Plain JSON of `value`; arrays and tensors (anything with `tolist()`, numpy's scalars
    included) as lists and numbers. ValueError for NaN or infinity, TypeError for the rest."""
    return json.dumps(
        value, allow_nan=False, ensure_ascii=True, separators=(",", ":"), default=_plain
    )


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} has no JSON form")


def send(channel: socket.socket, message: Any) -> None:
    data = dumps(message).encode()
    channel.sendall(_LENGTH.pack(len(data)) + data)


def receive(channel: socket.socket, *, max_bytes: int) -> Any | None:
    """The next frame's JSON value, or None when the other side closed between frames."""
    head = _exactly(channel, _LENGTH.size, eof_ok=True)
    if head is None:
        return None
    (length,) = _LENGTH.unpack(head)
    if length > max_bytes:
        raise FrameRefused(f"a frame of {length} bytes, over the {max_bytes} accepted")
    data = _exactly(channel, length, eof_ok=False)
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise FrameRefused(f"a frame that is not plain JSON ({exc})") from None


def _exactly(channel: socket.socket, size: int, *, eof_ok: bool) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = channel.recv(min(left, 1 << 20))
        if not chunk:
            if eof_ok and left == size:
                return None
            raise FrameRefused("a frame cut short (the other side closed)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")
