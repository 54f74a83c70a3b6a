"""An operator's change to the registry, made on one controller, applied by every controller.

The registry is built from the topic tree, which every controller hears; what is not on the tree (an
agent's name, tags and notes; an operator's delete) is told to the others on
`controllers/<instance>/registry` (QoS 1). Each applies it to its memory; the controller that took it
wrote it to the database already.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import aiomqtt

from ollama_fleet.contract.protocol import NODE_ID_RE, ProtocolError

from ollama_fleet.controller.registry.edits import Settings, parse_settings
from ollama_fleet.controller.registry.ingest import Ingest
from ollama_fleet.controller.registry.live import AgentRecord, Registry
from ollama_fleet.controller.registry.store import Store, delete_nodes, save_settings

log = logging.getLogger("fleet.peers")

KIND = "registry"


class RegistrySync:
    """The controller that takes an operator's change writes it to the database itself (leader or not) and
    tells the others, which apply it to their memory; the leader's flushes leave the operator's columns
    alone (controller/registry/store.py OPERATOR_COLUMNS), so a controller that missed the message cannot
    undo it."""

    def __init__(self, registry: Registry, ingest: Ingest, store: Callable[[], Store]) -> None:
        self.registry, self.ingest, self.store = registry, ingest, store
        ingest.peers[KIND] = self._on_peer

    async def update_settings(self, node: str, settings: Settings) -> AgentRecord:
        await self.store().write(save_settings, node, *settings)  # first: a failed write changes nothing
        a = self.registry.update_settings(node, *settings)
        name, tags, notes = settings
        await self._tell({"op": "settings", "node": node, "display_name": name, "tags": tags, "notes": notes})
        return a

    async def delete(self, node: str) -> None:
        self.registry.delete(node)
        await self.store().write(delete_nodes, [node])
        await self._tell({"op": "delete", "node": node})

    async def _tell(self, doc: dict[str, Any]) -> None:
        try:
            await self.ingest.publish_peer(KIND, doc)
        except aiomqtt.MqttError as e:  # written already; the others read it from the database when they start
            log.warning("could not tell the other controllers about %s of %s: %s", doc["op"], doc["node"], e)

    def _on_peer(self, instance: str, doc: dict[str, Any]) -> None:
        op, node = doc.get("op"), doc.get("node")
        if not isinstance(node, str) or not NODE_ID_RE.match(node) or op not in ("settings", "delete"):
            raise ProtocolError("bad_payload", f"registry change from {instance}")
        if node not in self.registry.agents:
            return  # deleted here already, or never seen: nothing to change
        if op == "delete":
            self.registry.delete(node)
            return
        parsed = parse_settings({k: v for k, v in doc.items() if k not in ("v", "op", "node")})
        if isinstance(parsed, str):
            raise ProtocolError("bad_payload", parsed)
        self.registry.update_settings(node, *parsed)
