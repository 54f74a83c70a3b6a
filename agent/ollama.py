"""The agent's view of its local Ollama: cheap probes of /api/version, /api/tags and /api/ps."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class OllamaStatus:
    up: bool
    version: str | None = None
    models: list[dict[str, Any]] = field(default_factory=list)  # /api/tags
    loaded: list[dict[str, Any]] = field(default_factory=list)  # /api/ps
    error: str | None = None


TAG_FIELDS = ("name", "model", "digest", "size", "modified_at", "details")
PS_FIELDS = ("name", "model", "digest", "size", "size_vram", "expires_at", "context_length", "details")


def _pick(item: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: item[k] for k in keys if k in item}


class OllamaClient:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url.rstrip("/")
        # trust_env=False: LAN/loopback traffic must never go through HTTP(S)_PROXY (stack-notes)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=timeout, trust_env=False)

    async def _get(self, path: str) -> Any:
        resp = await self.http.get(path)
        resp.raise_for_status()
        return resp.json()

    async def probe(self) -> OllamaStatus:
        """Up means all three answer in time; a hung Ollama times out and counts as down."""
        try:
            version, tags, ps = await asyncio.gather(
                self._get("/api/version"), self._get("/api/tags"), self._get("/api/ps"))
            return OllamaStatus(
                up=True,
                version=version.get("version"),
                models=sorted((_pick(m, TAG_FIELDS) for m in tags.get("models") or []), key=lambda m: m["name"]),
                loaded=sorted((_pick(m, PS_FIELDS) for m in ps.get("models") or []), key=lambda m: m["name"]),
            )
        except (httpx.HTTPError, ValueError, AttributeError, KeyError, TypeError) as e:
            # something answering that is not Ollama (or a broken one) counts as down, never kills the agent
            return OllamaStatus(up=False, error=f"{e.__class__.__name__}: {e}"[:200])

    async def aclose(self) -> None:
        await self.http.aclose()
