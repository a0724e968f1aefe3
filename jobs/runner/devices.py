"""The GPUs torch can see on this machine (after CUDA_VISIBLE_DEVICES), for the worker to report."""

from __future__ import annotations

import ctypes

# NVIDIA's driver library, which torch's CUDA runtime loads by this name: without it torch sees
# no GPU. (torch is installed as a CUDA or CPU build; ROCm builds are not supported.)
CUDA_DRIVER = "libcuda.so.1"


def cuda_driver_loads() -> bool:
    try:
        ctypes.CDLL(CUDA_DRIVER)
    except OSError:
        return False
    return True


def detect_gpus() -> list[dict[str, str | float]]:
    """[{"name", "memory_gb"}] per visible GPU; [] without CUDA or without torch installed.

    On a machine without NVIDIA's driver the answer is [] before torch is imported: importing it
    only to hear that cost a CPU worker's start 3 s of CPU."""
    if not cuda_driver_loads():
        return []
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
