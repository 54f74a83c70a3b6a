"""Who is on the other end: the client's address and whether it reached us over TLS.

Forwarding headers (`X-Forwarded-For`, `X-Forwarded-Proto`, `Forwarded`) are believed only from a peer
listed in `trusted_proxies`; anyone else could write them. A loopback peer that sends them anyway is a
reverse proxy we were not told about, so it is not treated as a local client (fail closed).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from typing import Iterable

from sanic import Request

from ollama_fleet.controller.edge.context import settings_of

FORWARD_HEADERS = ("x-forwarded-for", "x-forwarded-proto", "forwarded", "x-real-ip")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=32)
def networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """`trusted_proxies` as networks; a bad entry is a configuration error at start (see check_config)."""
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries if e.strip())


def check_config(entries: Iterable[str]) -> None:
    try:
        networks(tuple(entries))
    except ValueError as e:
        raise ValueError(f"trusted_proxies: {e}") from None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip("[]")
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def _trusted(addr: str, trusted: tuple[str, ...]) -> bool:
    ip = _ip(addr)
    return ip is not None and any(ip in n for n in networks(trusted))


def peer_ip(request: Request) -> str:
    """The socket peer's address (never a header)."""
    return str(request.conn_info.client_ip if request.conn_info else "") or request.ip or ""


def client_ip(request: Request) -> str:
    """The client's address: the socket peer, or for a trusted proxy the last untrusted X-Forwarded-For hop."""
    peer = peer_ip(request)
    trusted = _trusted_list(request)
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):  # right to left: the nearest hop a trusted proxy vouches for
        if not _trusted(hop, trusted):
            return hop if _ip(hop) is not None else peer
    return hops[0] if hops and _ip(hops[0]) is not None else peer


def is_tls(request: Request) -> bool:
    """True when the client's connection to us (or to the trusted proxy in front) is TLS."""
    if request.scheme in ("https", "wss") and request.conn_info is not None and request.conn_info.ssl:
        return True
    trusted = _trusted_list(request)
    if trusted and _trusted(peer_ip(request), trusted):
        proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        return proto == "https"
    return False


def from_trusted_proxy(request: Request) -> bool:
    trusted = _trusted_list(request)
    return bool(trusted) and _trusted(peer_ip(request), trusted)


def is_local(request: Request) -> bool:
    """A loopback client speaking to us directly (no forwarding headers): the newcomer on their own machine."""
    ip = _ip(peer_ip(request))
    if ip is None or not ip.is_loopback:
        return False
    return not any(h in request.headers for h in FORWARD_HEADERS)


def _trusted_list(request: Request) -> tuple[str, ...]:
    return settings_of(request).trusted_proxies
