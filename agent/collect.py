"""Host facts and load figures; every field fails soft so a broken collector never stops a heartbeat."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path
from typing import Any, Callable

import psutil


def soft(fn: Callable[[], Any], default: Any = None) -> Any:
    try:
        return fn()
    except Exception:
        return default


def ip_addresses() -> list[str]:
    """Non-loopback IPv4/IPv6 addresses, IPv4 first; loopback only when there is nothing else."""
    v4: list[str] = []
    v6: list[str] = []
    lo: list[str] = []
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            if a.family == socket.AF_INET:
                (lo if a.address.startswith("127.") else v4).append(a.address)
            elif a.family == socket.AF_INET6 and not a.address.startswith(("fe80", "::1")):
                v6.append(a.address.split("%")[0])
    return v4 + v6 or lo


def models_dir(configured: str) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("OLLAMA_MODELS"):
        return Path(os.environ["OLLAMA_MODELS"])
    return Path.home() / ".ollama" / "models"


def _disk(path: Path) -> Any:
    # the models directory may not exist yet: measure the nearest existing parent
    while not path.exists() and path != path.parent:
        path = path.parent
    return psutil.disk_usage(str(path))


def host_facts(disk_path: Path) -> dict[str, Any]:
    disk = soft(lambda: _disk(disk_path))
    return {
        "hostname": soft(socket.gethostname, "unknown"),
        "ips": soft(ip_addresses, []),
        "os": soft(lambda: f"{platform.system()} {platform.release()}", "unknown"),
        "arch": soft(platform.machine),
        "cpu_count": soft(psutil.cpu_count),
        "mem_total": soft(lambda: psutil.virtual_memory().total),
        "disk_path": str(disk_path),
        "disk_total": disk.total if disk else None,
        "disk_free": disk.free if disk else None,
    }


def load_figures() -> dict[str, Any]:
    # cpu_percent(None) compares with the previous call: non-blocking, right for a periodic loop
    vm = soft(psutil.virtual_memory)
    return {
        "cpu": soft(lambda: psutil.cpu_percent(None)),
        "mem": vm.percent if vm else None,
        "mem_used": vm.used if vm else None,
        "load1": soft(lambda: os.getloadavg()[0]),
    }
