"""Pull a default model once Ollama is up (R-O6 / seed FR-016h).

Deliberately small and separate: it calls Ollama's `/api/pull` directly and reports progress as a
`model.pull` job with `origin: "default"`, so it can later move onto the controller's job mechanism.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import httpx

from ollama_fleet.contract.jobs import JobVerb
from ollama_fleet.agent.progress import JobReport, Meter
from ollama_fleet.model_tiers import largest_gpu_memory, load_tiers
from ollama_fleet.settings import Config

log = logging.getLogger("fleet.agent.default_model")

PULL_READ_TIMEOUT = 600.0  # Ollama can go quiet for minutes while verifying a large blob

Emit = Callable[[dict[str, Any]], None]
Event = Callable[..., None]  # event(name, level, message, **fields)


class PullError(Exception):
    pass


def choose_default_model(cfg: Config, gpus: list[dict[str, Any]], ram: int | None) -> str | None:
    """The operator's `default_model`, else the first model of the tier for this machine's memory."""
    if cfg.default_model:
        return cfg.default_model
    models = load_tiers(cfg.model_tiers_file).choose(largest_gpu_memory(gpus), ram)
    return models[0] if models else None


def _same_model(a: str, b: str) -> bool:
    def norm(n: str) -> str:
        return n if ":" in n.rsplit("/", 1)[-1] else n + ":latest"
    return norm(a) == norm(b)


def job_id_for(model: str) -> str:
    return "default-" + re.sub(r"[^A-Za-z0-9._:-]+", "-", model)[:80] + f"-{int(time.time())}"


async def pull(client: httpx.AsyncClient, model: str, job: JobReport) -> None:
    """Stream `/api/pull`, summing per-layer progress; raises PullError on an in-band or HTTP error."""
    layers: dict[str, tuple[int, int]] = {}
    meter = Meter()
    async with client.stream("POST", "/api/pull", json={"model": model, "stream": True},
                             timeout=httpx.Timeout(10.0, read=PULL_READ_TIMEOUT)) as resp:
        if resp.status_code >= 400:
            body = (await resp.aread()).decode(errors="replace")
            try:
                body = json.loads(body).get("error", body)
            except (ValueError, AttributeError):
                pass
            raise PullError(f"HTTP {resp.status_code}: {body}"[:300])
        async for line in resp.aiter_lines():
            if not line.strip():
                continue
            doc = json.loads(line)
            if doc.get("error"):
                raise PullError(str(doc["error"])[:300])
            status = str(doc.get("status", ""))
            if doc.get("digest") and doc.get("total"):
                layers[doc["digest"]] = (int(doc.get("completed") or 0), int(doc["total"]))
                meter.update(sum(c for c, _ in layers.values()), sum(t for _, t in layers.values()))
                job.progress(meter, phase="downloading")
            elif status == "success":
                job.finish(True, meter=meter)
                return
            elif status:
                job.progress(meter, phase=status)
    raise PullError("the pull stream ended without success")


async def ensure_default_model(cfg: Config, ollama_url: str, gpus: list[dict[str, Any]], ram: int | None,
                               emit: Emit, event: Event) -> str | None:
    """Pull the default model unless Ollama has it; returns its name (None when there is none to pull)."""
    model = choose_default_model(cfg, gpus, ram)
    if not model:
        return None
    async with httpx.AsyncClient(base_url=ollama_url.rstrip("/"), trust_env=False, timeout=10.0) as client:
        tags = (await client.get("/api/tags")).json().get("models") or []
        if any(_same_model(m.get("name", ""), model) for m in tags):
            log.info("default model %s is already installed", model)
            return model
        job = JobReport(job_id_for(model), JobVerb.PULL, emit, origin="default", args={"model": model})
        event("default_model_pull_started", "info", f"pulling default model {model}", model=model,
              job_id=job.job_id)
        job.start(phase="pulling manifest")
        keepalive = asyncio.create_task(job.keepalive())  # a status every few s, even when Ollama is quiet
        try:
            await pull(client, model, job)
        except (PullError, httpx.HTTPError, ValueError) as e:
            msg = f"default model {model}: {e.__class__.__name__ if not str(e) else e}"
            job.finish(False, error=msg)
            event("default_model_pull_failed", "error", msg, model=model, job_id=job.job_id)
            return model
        finally:
            keepalive.cancel()
        event("default_model_pulled", "info", f"default model {model} is installed", model=model,
              job_id=job.job_id)
        return model
