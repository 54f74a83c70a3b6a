"""ollama-fleet: shared contract (topics, payloads, settings) and the `fleet` CLI."""

from __future__ import annotations

__version__ = "0.1.0"
