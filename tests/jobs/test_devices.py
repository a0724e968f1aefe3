"""What a worker reports of its GPUs (jobs.runner.devices), asked as jobs.worker asks it."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from jobs.runner import devices

ASK = (
    "import json, sys; from jobs.runner import devices; {patch}"
    "print(json.dumps([devices.detect_gpus(), 'torch' in sys.modules]))"
)


def _ask(patch: str = "") -> list:
    out = subprocess.run(
        [sys.executable, "-c", ASK.format(patch=patch)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_without_the_cuda_driver_there_are_no_gpus_and_torch_is_never_imported():
    gpus, imported_torch = _ask("devices.CUDA_DRIVER = 'libcuda-not-installed.so.1'; ")
    assert gpus == [] and imported_torch is False


def test_with_the_driver_torch_names_each_visible_gpu_and_its_memory(monkeypatch):
    properties = [
        SimpleNamespace(name="NVIDIA A100-SXM4-40GB", total_memory=40 * 1024**3),
        SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=int(79.6 * 1024**3)),
    ]
    cuda = SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: len(properties),
        get_device_properties=properties.__getitem__,
    )
    monkeypatch.setattr(devices, "cuda_driver_loads", lambda: True)
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    assert devices.detect_gpus() == [
        {"name": "NVIDIA A100-SXM4-40GB", "memory_gb": 40.0},
        {"name": "NVIDIA H100 80GB HBM3", "memory_gb": 79.6},
    ]
    cuda.is_available = lambda: False  # a driver, but no device torch may use
    assert devices.detect_gpus() == []
