"""What the HTTP edge reads from the running controller, typed.

The edge sits below the composition root (controller/compose.py builds every part and imports the edge),
so it cannot import `Fleet`; it sees it through this narrow Protocol instead of reading attributes off
Sanic's untyped `app.ctx`. `Fleet` satisfies it (mypy checks that where app.py stores it).
"""

from __future__ import annotations

from typing import Protocol, cast

from sanic import Request

from ollama_fleet.controller.edge.throttle import Throttle
from ollama_fleet.settings import Config


class EdgeView(Protocol):
    @property
    def cfg(self) -> Config: ...

    @property
    def throttle(self) -> Throttle: ...

    @property
    def keys_in_use(self) -> bool: ...


def edge_of(request: Request) -> EdgeView:
    return cast(EdgeView, request.app.ctx.fleet)


def settings_of(request: Request) -> Config:
    return edge_of(request).cfg
