"""Model files we accept: safetensors weights (header parsed, never executed) and JSON configs."""

import json
import struct
from pathlib import Path

from .errors import InvalidArtifact

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
SAFETENSORS_DTYPES = {
    "BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "F64", "I64", "U64",
}  # fmt: skip


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Validate a safetensors file and return its tensors: name -> {"dtype", "shape"}.

    The format is an 8-byte little-endian header length, a JSON header, then raw bytes; checking
    that every tensor's offsets tile the data exactly rejects truncated or padded files.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise InvalidArtifact("The weights file is too short to be safetensors.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise InvalidArtifact(
                "The weights file is not safetensors: its header length is wrong."
            )
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArtifact(
                "The weights file is not safetensors: its header is not JSON."
            ) from exc
    if not isinstance(header, dict):
        raise InvalidArtifact("The weights file is not safetensors: its header is not an object.")
    header.pop("__metadata__", None)
    data_len = size - 8 - header_len
    tensors, spans = {}, []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArtifact(f"Tensor {name!r} in the weights file is malformed.") from exc
        if dtype not in SAFETENSORS_DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InvalidArtifact(f"Tensor {name!r} has an unknown dtype or a bad shape.")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise InvalidArtifact(f"Tensor {name!r} points outside the weights file.")
        tensors[name] = {"dtype": dtype, "shape": shape}
        spans.append((start, end))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise InvalidArtifact("The weights file has gaps or overlapping tensors.")
        position = end
    if position != data_len:
        raise InvalidArtifact("The weights file has trailing bytes after its tensors.")
    if not tensors:
        raise InvalidArtifact("The weights file holds no tensors.")
    return tensors


def parse_config(raw: bytes) -> dict:
    if len(raw) > MAX_CONFIG_BYTES:
        raise InvalidArtifact("The config is larger than 1 MiB.")
    try:
        config = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArtifact("The config is not valid JSON.") from exc
    if not isinstance(config, dict):
        raise InvalidArtifact("The config must be a JSON object.")
    return config
