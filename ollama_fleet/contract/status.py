"""Agent statuses: what an agent says about itself on the wire, and what the controller derives.

`online`/`offline`/`lost` travel in the retained `state` payload (`lost` is the Last Will); the
controller adds `stale` (no heartbeat within stale_after) and `ollama_down` (online, Ollama not
answering). Every list, filter, count and label of statuses is built from this one enum.
"""

from __future__ import annotations

from enum import StrEnum


class AgentStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    LOST = "lost"
    STALE = "stale"
    OLLAMA_DOWN = "ollama_down"


WIRE_STATES: tuple[str, ...] = (AgentStatus.ONLINE, AgentStatus.OFFLINE, AgentStatus.LOST)
ALL: tuple[str, ...] = tuple(s.value for s in AgentStatus)
