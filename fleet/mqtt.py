"""Broker connection parameters shared by agent and controller, and the reconnect backoff."""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from .settings import Config, ConfigError

RECONNECT_MIN = 0.5  # seconds; module level so tests can shrink them
RECONNECT_MAX = 30.0


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def from_config(cls, cfg: Config) -> BrokerAddress:
        url = cfg.mqtt_url
        if not url:
            raise ConfigError("mqtt_url is required")
        parts = urlsplit(url if "://" in url else "mqtt://" + url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"mqtt_url: unsupported scheme {parts.scheme!r}")
        tls = parts.scheme in ("mqtts", "ssl")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or (8883 if tls else 1883),
            username=cfg.mqtt_username or (unquote(parts.username) if parts.username else None),
            password=cfg.mqtt_password or (unquote(parts.password) if parts.password else None),
            tls=tls,
        )

    def __repr__(self) -> str:  # never print the password
        return f"BrokerAddress({self.host}:{self.port}, user={self.username!r}, tls={self.tls})"


def protocol(cfg: Config) -> aiomqtt.ProtocolVersion:
    return aiomqtt.ProtocolVersion.V5 if str(cfg.mqtt_protocol) == "5" else aiomqtt.ProtocolVersion.V311


def client_kwargs(cfg: Config, identifier: str, will: aiomqtt.Will | None = None) -> dict[str, Any]:
    addr = BrokerAddress.from_config(cfg)
    kw: dict[str, Any] = dict(
        hostname=addr.host,
        port=addr.port,
        username=addr.username,
        password=addr.password,
        identifier=identifier,
        protocol=protocol(cfg),
        keepalive=int(cfg.mqtt_keepalive),
        will=will,
        timeout=10,
        max_queued_incoming_messages=0,
    )
    if addr.tls:
        kw["tls_context"] = ssl.create_default_context()
    return kw


def expiry(cfg: Config, seconds: float) -> Properties | None:
    """MQTT5 message expiry so stale heartbeats/progress are never served late; None on 3.1.1."""
    if str(cfg.mqtt_protocol) != "5":
        return None
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = max(1, int(seconds))
    return props


def backoff(attempt: int) -> float:
    """Full-jitter exponential backoff: many agents reconnecting after a broker restart spread out."""
    return random.uniform(RECONNECT_MIN, min(RECONNECT_MAX, RECONNECT_MIN * 2 ** attempt))
