"""Which URL the controller uses to reach an agent's Ollama.

Agents usually talk to Ollama on loopback (its default bind). From the controller on another machine
that URL would point at the controller itself, so a loopback host is replaced by the agent's LAN
address, unless the agent shares an address with this machine (controller and agent side by side).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from urllib.parse import urlsplit, urlunsplit

import psutil

LOOPBACK_NAMES = {"localhost", "0.0.0.0", "::", ""}


@functools.lru_cache(maxsize=1)
def local_addresses() -> frozenset[str]:
    addrs = {a.address.split("%")[0] for nic in psutil.net_if_addrs().values() for a in nic
             if a.family in (socket.AF_INET, socket.AF_INET6)}
    return frozenset(addrs)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def effective_url(url: str, agent_ips: list[str], advertised: str | None = None) -> str:
    if advertised:
        return advertised.rstrip("/")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not _is_loopback(host) or not agent_ips or local_addresses() & set(agent_ips):
        return url.rstrip("/")
    ip = agent_ips[0]  # agents list IPv4 first
    netloc = f"[{ip}]" if ":" in ip else ip
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc)).rstrip("/")
