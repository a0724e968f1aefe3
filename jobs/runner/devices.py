"""The GPUs torch can see on this machine (after CUDA_VISIBLE_DEVICES), for the worker to report."""

from __future__ import annotations


def detect_gpus() -> list[dict[str, str | float]]:
    """[{"name", "memory_gb"}] per visible GPU; [] without CUDA or without torch installed."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [
        {"name": props.name, "memory_gb": round(props.total_memory / 1024**3, 1)}
        for props in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))
    ]
