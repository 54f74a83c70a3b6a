"""NVIDIA GPU inventory and metrics through NVML; no driver or no GPU means an empty list, never an error."""

from __future__ import annotations

import logging
from typing import Any, Callable

log = logging.getLogger("fleet.agent.gpu")

try:  # the nvidia-ml-py distribution; import can only fail if the package is absent
    import pynvml
except ImportError:  # pragma: no cover
    pynvml = None


def _soft(fn: Callable[..., Any], *args: Any) -> Any:
    """One field failing (NotSupported on consumer cards, say) leaves that field None."""
    try:
        return fn(*args)
    except Exception:
        return None


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class Gpus:
    def __init__(self) -> None:
        self.available = False
        self.driver: str | None = None
        self._handles: list[Any] = []
        if pynvml is None:
            return
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self.driver = _text_or_none(_soft(pynvml.nvmlSystemGetDriverVersion))
            self.available = True
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            log.info("no NVIDIA GPU telemetry: %s", e.__class__.__name__)

    def inventory(self) -> list[dict[str, Any]]:
        out = []
        for i, h in enumerate(self._handles):
            mem = _soft(pynvml.nvmlDeviceGetMemoryInfo, h)
            out.append({
                "index": i,
                "uuid": _text_or_none(_soft(pynvml.nvmlDeviceGetUUID, h)),
                "name": _text_or_none(_soft(pynvml.nvmlDeviceGetName, h)) or f"GPU {i}",
                "mem_total": mem.total if mem else None,
                "driver": self.driver,
            })
        return out

    def metrics(self) -> list[dict[str, Any]]:
        out = []
        for i, h in enumerate(self._handles):
            mem = _soft(pynvml.nvmlDeviceGetMemoryInfo, h)
            power_mw = _soft(pynvml.nvmlDeviceGetPowerUsage, h)
            out.append({
                "index": i,
                "util": getattr(_soft(pynvml.nvmlDeviceGetUtilizationRates, h), "gpu", None),
                "mem_used": mem.used if mem else None,
                "mem_total": mem.total if mem else None,
                "temp": _soft(_temperature, h),
                "power": round(power_mw / 1000, 1) if power_mw is not None else None,
            })
        return out

    def close(self) -> None:
        if self.available:
            _soft(pynvml.nvmlShutdown)
            self.available = False


def _temperature(handle: Any) -> int:
    if hasattr(pynvml, "nvmlDeviceGetTemperatureV"):
        try:
            return int(pynvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU))
        except Exception:
            pass
    return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
