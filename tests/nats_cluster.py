"""Test support: a three-node NATS cluster (JetStream + MQTT 3.1.1) on loopback ports, the clustered broker
of docs/scaling.md.

Each node has its own config file, JetStream store and MQTT listener, with cluster routes to the others.
Accounts and rights come from the shipped broker/fleet.acl, translated to NATS permissions (MQTT topic
`a/b/#` is NATS subject `a.b.>` plus `a.b`; `+` is `*`): the same policy as Mosquitto, written out per
user because NATS' static config has no `%u` pattern. Users are added at run time by rewriting every
node's config and sending SIGHUP (a NATS config reload).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import quote

from ollama_fleet.broker.local import free_loopback_port
from tests.mosquitto import (
    CONNACK_ACCEPTED,
    DEFAULT_USERS,
    SHIPPED_ACL,
    connect_packet,
    mqtt_connect_rc,
    wait_for_broker,
)

HOST = "127.0.0.1"
CLUSTER = "fleet"
START_TIMEOUT_S = 30.0
# MQTT QoS 1 subscriptions are JetStream consumers delivering on $MQTT.sub.<nuid>: a user with any
# permissions at all needs this to receive QoS 1 messages (NATS MQTT docs, "Authorization").
MQTT_INTERNAL_SUBSCRIBE = "$MQTT.sub.>"


class NatsMissing(RuntimeError):
    pass


def _read(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def qos1_subscribe_ok(port: int, user: str, password: str, topic: str = "fleet/v1/controller/status") -> bool:
    """One raw MQTT 3.1.1 session: CONNECT, then a QoS 1 SUBSCRIBE granted QoS 1. On NATS that needs the
    JetStream session stream and a new consumer: the cluster is usable for our clients, not just up."""
    with socket.create_connection((HOST, port), timeout=5) as s:
        s.sendall(connect_packet(user, password))
        if _read(s, 4) != b"\x20\x02\x00\x00":  # CONNACK, accepted
            return False
        name = topic.encode()
        body = (1).to_bytes(2, "big") + len(name).to_bytes(2, "big") + name + b"\x01"
        s.sendall(bytes([0x82, len(body)]) + body)
        granted = _read(s, 5) == b"\x90\x03\x00\x01\x01"  # SUBACK for packet 1: QoS 1
        s.sendall(b"\xe0\x00")  # DISCONNECT: no will
        return granted


def find_nats_server() -> str | None:
    return os.environ.get("FLEET_NATS_BIN") or shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if os.access("/usr/sbin/nats-server", os.X_OK) else None)


def topic_subjects(topic: str) -> list[str]:
    """The NATS subjects an MQTT topic filter covers (`#` also matches its parent level; a `.` would be
    `//` in the NATS releases that accept it, 2.9.10 does not: docs/scaling.md)."""
    levels = ["*" if lv == "+" else lv.replace(".", "//") for lv in topic.split("/")]
    if levels[-1] != "#":
        return [".".join(levels)]
    parent = ".".join(levels[:-1])
    return [parent + ".>", parent] if parent else [">"]


@dataclass
class Rights:
    """One user's NATS permissions."""
    pub_allow: list[str] = field(default_factory=list)
    sub_allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)

    def grant(self, access: str, topic: str) -> None:
        if topic.startswith("$"):  # Mosquitto's $SYS tree: NATS' MQTT side has none
            return
        subjects = topic_subjects(topic)
        if access == "deny":
            self.deny += subjects
            return
        if access in ("write", "readwrite"):
            self.pub_allow += subjects
        if access in ("read", "readwrite"):
            self.sub_allow += subjects

    def conf(self) -> str:
        def block(allow: list[str]) -> str:
            return f"{{ allow: {_list(allow)}" + (f", deny: {_list(self.deny)}" if self.deny else "") + " }"
        subscribe = block([*self.sub_allow, MQTT_INTERNAL_SUBSCRIBE])
        return f"{{ publish: {block(self.pub_allow)}, subscribe: {subscribe} }}"


def _list(items: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in dict.fromkeys(items)) + "]"


def acl_rights(acl: str, user: str) -> Rights:
    """`user`'s rights under a Mosquitto ACL file: every `pattern` line (with %u), plus the `topic` lines
    of its own `user` block."""
    rights = Rights()
    block: str | None = None
    for raw in acl.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):  # whole-line comments only: topics hold "#" too
            continue
        words = line.split()
        if words[0] == "user":
            block = words[1]
        elif words[0] == "pattern":
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            rights.grant(access, topic.replace("%u", user))
        elif words[0] == "topic" and block == user:
            access, topic = (words[1], words[2]) if len(words) == 3 else ("readwrite", words[1])
            rights.grant(access, topic)
    return rights


@dataclass
class NatsNode:
    name: str
    dir: Path
    client_port: int
    cluster_port: int
    mqtt_port: int
    http_port: int
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None

    @property
    def conf_path(self) -> Path:
        return self.dir / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / "nats.log"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def mqtt_clients(self) -> list[tuple[str, str]]:
        """(account, MQTT client id) of every MQTT connection this node holds (monitoring /connz)."""
        url = f"http://{HOST}:{self.http_port}/connz?auth=1&limit=1024"
        with urllib.request.urlopen(url, timeout=2) as resp:
            conns = json.load(resp).get("connections") or []
        return [(c.get("authorized_user", ""), c["mqtt_client"]) for c in conns if c.get("mqtt_client")]

    def start(self, binary: str) -> None:
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()/kill()
        self.proc = subprocess.Popen([binary, "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)

    def healthy(self) -> bool:
        """/healthz answers 200 once the node's JetStream is current with the cluster."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.http_port}/healthz", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: the node vanishes mid-conversation, as in a machine or process crash."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self.log_file is not None and not self.log_file.closed:
            self.log_file.close()


class NatsCluster:
    """Three (or `size`) NATS nodes routed to each other, each with JetStream and an MQTT listener."""

    def __init__(self, tmp: Path, binary: str, size: int = 3, users: Iterable[str] = DEFAULT_USERS) -> None:
        self.binary = binary
        self.passwords = {u: secrets.token_urlsafe(12) for u in users}
        self.sys_password = secrets.token_urlsafe(12)
        self.nodes = []
        for i in range(size):
            node_dir = tmp / f"n{i + 1}"
            (node_dir / "jetstream").mkdir(parents=True, exist_ok=True)
            self.nodes.append(NatsNode(f"n{i + 1}", node_dir, free_loopback_port(), free_loopback_port(),
                                       free_loopback_port(), free_loopback_port()))

    # ---- configuration -----------------------------------------------------------------------------
    def _conf(self, node: NatsNode) -> str:
        acl = SHIPPED_ACL.read_text()
        users = ",\n      ".join(
            f'{{ user: "{u}", password: "{pw}", permissions: {acl_rights(acl, u).conf()} }}'
            for u, pw in self.passwords.items())
        routes = ", ".join(f'"nats-route://{HOST}:{n.cluster_port}"' for n in self.nodes if n is not node)
        return f"""# tests/nats_cluster.py: node {node.name} of a {len(self.nodes)}-node cluster
server_name: "{node.name}"
listen: "{HOST}:{node.client_port}"
http: "{HOST}:{node.http_port}"
jetstream {{ store_dir: "{node.dir / 'jetstream'}", max_memory_store: 64MB, max_file_store: 256MB }}
cluster {{
  name: "{CLUSTER}"
  listen: "{HOST}:{node.cluster_port}"
  routes: [{routes}]
}}
# stream_replicas: without it the MQTT streams (sessions, retained messages, QoS 1) get as many
# replicas as nodes were routed when the first client connected, and an R2 stream stops on one loss
mqtt {{ listen: "{HOST}:{node.mqtt_port}", stream_replicas: {len(self.nodes)} }}
accounts {{
  FLEET: {{
    jetstream: enabled
    users: [
      {users}
    ]
  }}
  SYS: {{ users: [{{ user: "sys", password: "{self.sys_password}" }}] }}
}}
system_account: SYS
"""

    def _write_confs(self) -> None:
        for node in self.nodes:
            node.conf_path.write_text(self._conf(node))

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> NatsCluster:
        self._write_confs()
        for node in self.nodes:
            node.start(self.binary)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Every live node healthy and granting a QoS 1 subscription (the account's MQTT streams and each
        subscription's consumer need JetStream leaders, so that is the last thing to work)."""
        live = [n for n in self.nodes if n.alive]
        self._wait_for(lambda: all(n.healthy() for n in live), "JetStream healthy on every node", timeout)
        password = self.passwords["controller"]
        for n in live:
            self._wait_for(lambda n=n: qos1_subscribe_ok(n.mqtt_port, "controller", password),  # type: ignore[misc]
                           f"MQTT login and QoS 1 subscription on {n.name}", timeout)

    def kill(self, index: int) -> NatsNode:
        node = self.nodes[index]
        node.kill()
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    # ---- accounts ----------------------------------------------------------------------------------
    def add_user(self, name: str) -> str:
        """A new account with the shipped ACL's rights for `name`; every live node reloads its config.
        Returns the password."""
        self.passwords[name] = secrets.token_urlsafe(12)
        self._write_confs()
        for node in self.nodes:
            if node.alive:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGHUP)
        for node in self.nodes:
            if node.alive:
                self._wait_for(lambda n=node: self.connect_rc(n, name) == CONNACK_ACCEPTED,  # type: ignore[misc]
                               f"user {name!r} accepted on {node.name}")
        return self.passwords[name]

    def connect_rc(self, node: NatsNode, user: str) -> int:
        return mqtt_connect_rc(HOST, node.mqtt_port, user, self.passwords[user])

    def node_url(self, node: NatsNode, user: str) -> str:
        return f"mqtt://{quote(user, safe='')}:{quote(self.passwords[user], safe='')}@{HOST}:{node.mqtt_port}"

    def url(self, user: str, order: Iterable[int] | None = None) -> str:
        """mqtt_url for `user`: every node, in the given order of node indexes (default: 0, 1, 2)."""
        indexes = range(len(self.nodes)) if order is None else order
        return ",".join(self.node_url(self.nodes[i], user) for i in indexes)

    def where(self, user: str) -> list[int]:
        """Indexes of the live nodes `user` has an MQTT connection on (one per connection)."""
        return [i for i, n in enumerate(self.nodes) if n.alive for u, _ in n.mqtt_clients() if u == user]

    def log_text(self) -> str:
        return "\n".join(f"--- {n.name}\n{n.log_text()[-3000:]}" for n in self.nodes)

    def _wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = START_TIMEOUT_S) -> None:
        wait_for_broker("nats cluster", predicate, what, self._check_alive, self.log_text, timeout, 0.05)

    def _check_alive(self) -> None:
        dead = [n.name for n in self.nodes if n.proc is not None and n.proc.poll() is not None
                and n.log_file is not None and not n.log_file.closed]
        if dead:
            raise RuntimeError(f"nats-server {dead} exited:\n{self.log_text()}")


def start_nats_cluster(tmp: Path, size: int = 3) -> NatsCluster:
    binary = find_nats_server()
    if binary is None:
        raise NatsMissing("nats-server not found (install Debian's 'nats-server' or set FLEET_NATS_BIN)")
    cluster = NatsCluster(tmp, binary, size)
    try:
        return cluster.start()
    except BaseException:
        cluster.stop()
        raise

