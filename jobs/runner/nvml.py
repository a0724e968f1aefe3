"""The one place the worker speaks to NVML (pynvml, from nvidia-ml-py): each allocated GPU's
utilization and memory. Tests replace `pynvml` here with a fake; nothing else imports it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


class NvmlUnavailable(Exception):
    """No NVML here (the package, the driver's library or a GPU missing), or it failed."""


@dataclass(frozen=True)
class GpuReading:
    index: int
    utilization: float  # percent of the driver's last sample period a kernel ran
    memory_used: int  # bytes, the whole device's (a slot is a whole GPU)
    memory_total: int


class Nvml:
    """An initialized NVML session; `read` raises NvmlUnavailable on any NVML error."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # ImportError, or pynvml.NVMLError (no driver library, no GPU)
            raise NvmlUnavailable(f"NVML is unavailable: {exc}") from exc
        self._pynvml = pynvml

    def read(self, indices: list[int]) -> list[GpuReading]:
        """Each device's reading, by NVML index (the worker's slot index)."""
        nvml = self._pynvml
        try:
            readings = []
            for index in indices:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                readings.append(
                    GpuReading(
                        index=index,
                        utilization=float(rates.gpu),
                        memory_used=int(memory.used),
                        memory_total=int(memory.total),
                    )
                )
            return readings
        except Exception as exc:  # pynvml.NVMLError and whatever a broken binding raises
            raise NvmlUnavailable(f"NVML failed: {exc}") from exc

    def close(self) -> None:
        # Shutting down a session that failed tells nothing more.
        with contextlib.suppress(Exception):
            self._pynvml.nvmlShutdown()
