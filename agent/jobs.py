"""Model jobs on the agent: `model.pull`, `model.delete` and `job.cancel` commands, status on `jobs/<id>`.

The agent owns the HTTP connection to its Ollama (a pull dies with the connection that asked for it), so
a job survives the controller, the dashboard and the broker going away; it only ends with the agent.
Every status is the whole retained document (specs/mqtt.md, job protocol); progress is throttled to one
document a second and never silent for more than five, and the latest status of every unfinished job is
published again on each new broker connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ollama_fleet.agent import collect
from ollama_fleet.agent.outbox import Publisher
from ollama_fleet.agent.progress import human_bytes
from ollama_fleet.contract.jobs import TERMINAL, JobFigures, JobStatus, JobVerb
from ollama_fleet.contract.model_names import normalize, valid_model_name
from ollama_fleet.contract.protocol import JOB_ID_RE, PROTO, PROTO_RANGE
from ollama_fleet.settings import Config

log = logging.getLogger("fleet.agent.jobs")

# module level so tests can shrink them
PROGRESS_MIN_INTERVAL = 1.0  # at most one progress document a second per job...
PROGRESS_MAX_SILENCE = 5.0  # ...and at least one every five while it is not finished
TICK = 0.25  # seconds between throttle checks
JOBS_REMEMBERED = 1000  # finished jobs kept so a duplicate command re-publishes instead of re-running
PULL_CONNECT_TIMEOUT = 10.0
PULL_READ_TIMEOUT = 600.0  # Ollama can go quiet for minutes while it verifies a large blob
DELETE_TIMEOUT = 60.0
PROGRESS_BEFORE_SUCCESS = 0.999  # until Ollama says `success` (verification and manifest still to come)
SPEED_WINDOW = 5.0  # seconds of history behind the speed figure
SPEED_MIN_SPAN = 0.5  # less history than this is no speed: buffered lines can arrive in one burst

ENVELOPE = ("v", "job_id", "expires_at", "origin")

CommandHandler = Callable[[dict[str, Any]], Awaitable[None]]
Work = Callable[["Job"], Awaitable[None]]


class JobError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Job(JobFigures):
    job_id: str
    verb: str
    args: dict[str, Any]
    origin: str
    generated: bool = False
    digest: str | None = None
    layers: dict[str, list[int]] = field(default_factory=dict)  # digest -> [completed, total]
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    # runtime only
    last_sent: float = float("-inf")  # monotonic time the last document was queued
    dirty: bool = False
    cancel_requested: bool = False
    bytes_seen: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def document(self, session: str) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "v": PROTO, "job_id": self.job_id, "verb": self.verb, "args": self.args, "origin": self.origin,
            "status": self.status, "seq": self.seq, "session": session, "ts": time.time(),
            "progress": self.progress, "completed": self.completed, "total": self.total, "speed": self.speed,
            "eta": self.eta, "phase": self.phase, "digest": self.digest, "error": self.error,
            "error_code": self.error_code,
            "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
        }
        if self.layers:
            doc["layers"] = self.layers
        if self.generated:
            doc["job_id_generated"] = True
        return doc


def _error_text(resp_body: bytes) -> str:
    text = resp_body.decode(errors="replace").strip()
    with contextlib.suppress(ValueError, AttributeError):
        text = str(json.loads(text).get("error") or text)
    return text[:500]


def _pull_error(message: str) -> JobError:
    low = message.lower()
    if "file does not exist" in low or "manifest unknown" in low or "not found" in low:
        return JobError("not_found", f"model not found in the registry: {message}")
    if "no space left" in low or ("disk" in low and "full" in low):
        return JobError("disk_full", f"insufficient storage: {message}")
    return JobError("pull_failed", message)


class Rate:
    """Bytes per second over the last SPEED_WINDOW seconds, from (time, bytes done) samples."""

    def __init__(self) -> None:
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, done: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self.samples and done < self.samples[-1][1]:
            self.samples.clear()  # a layer restarted: old samples say nothing about now
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= SPEED_WINDOW:
            self.samples.popleft()

    def speed(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 - t0 >= SPEED_MIN_SPAN else None


class JobRunner:
    """Runs the job verbs (`handlers`) against the agent's Ollama; status goes to the `publisher`.

    `ollama` is the agent's own client for its Ollama (trust_env=False: never through HTTP(S)_PROXY); a new
    client per runner would cost tens of milliseconds of certificate loading on the first job."""

    def __init__(self, cfg: Config, publisher: Publisher, ollama: httpx.AsyncClient, disk_path: Path) -> None:
        self.cfg, self.publisher, self._ollama, self.disk_path = cfg, publisher, ollama, disk_path
        self.concurrency = max(1, cfg.pull_concurrency)
        override = cfg.gpu_mem_override
        self.gpu_mem_override = int(override * 1e9) if override > 0 else None
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._slots = asyncio.Semaphore(self.concurrency)
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = False

    # ---- what the agent reports ------------------------------------------------------------
    def handlers(self) -> dict[str, CommandHandler]:
        """The command verbs this runner answers, for the agent's dispatcher."""
        return {JobVerb.PULL: self._cmd_pull, JobVerb.DELETE: self._cmd_delete, "job.cancel": self._cmd_cancel}

    def info(self) -> dict[str, Any]:
        """Fields of the `info` snapshot the controller's dispatcher and auto-distribution read."""
        return {"jobs": {"pull_concurrency": self.concurrency}, "gpu_mem_override": self.gpu_mem_override}

    def active(self) -> list[Job]:
        return [j for j in self.jobs.values() if not j.done]

    # ---- lifecycle -------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._tasks:
            return
        self._tasks = [asyncio.create_task(self._ticker(), name="jobs-ticker")]

    async def stop(self) -> None:
        """The agent is going away: its jobs end with it (the controller notices and re-dispatches)."""
        self._stopping = True
        running = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for t in [*running, *self._tasks]:
            t.cancel()
        await asyncio.gather(*running, *self._tasks, return_exceptions=True)
        self._tasks = []

    # ---- status publishing -----------------------------------------------------------------
    def _send(self, job: Job) -> None:
        """Queue the job's status; it is rendered when it goes out, so it is the latest then. A running job
        is announced again on every new broker connection."""
        job.dirty = False
        job.last_sent = time.monotonic()
        self.publisher.job_status(job.job_id, functools.partial(self._render, job.job_id), live=not job.done)

    def _render(self, job_id: str, session: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        if job is None:  # forgotten meanwhile (JOBS_REMEMBERED): nothing to say any more
            return None
        job.seq += 1
        return job.document(session)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for job in self.active():
                since = now - job.last_sent
                if (job.dirty and since >= PROGRESS_MIN_INTERVAL) or since >= PROGRESS_MAX_SILENCE:
                    self._send(job)

    # ---- commands --------------------------------------------------------------------------
    def _accept(self, doc: dict[str, Any], verb: str) -> Job | None:
        """A new job from a command, or None when there is nothing (more) to run."""
        self._ensure_started()
        job_id, generated, problem = doc.get("job_id"), False, None
        if job_id is None:
            job_id, generated = uuid.uuid4().hex, True
        elif not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
            problem = JobError("bad_request", f"job_id must match {JOB_ID_RE.pattern}")
            job_id, generated = uuid.uuid4().hex, True
        if job_id in self.jobs:  # a QoS 1 duplicate or a controller retry: same job, status again
            self._send(self.jobs[job_id])
            return None
        origin = str(doc["origin"])[:32] if isinstance(doc.get("origin"), str) else "mqtt"
        args = {k: v for k, v in doc.items() if k not in ENVELOPE}
        job = Job(str(job_id), verb, args, origin, generated)
        problem = problem or self._check(doc, verb)
        self._remember(job)
        if problem is not None:
            log.warning("job %s (%s) rejected: %s", job_id, verb, problem.message)
            self._end(job, JobStatus.REJECTED, problem)
            return None
        log.info("job %s: %s %s (origin %s)", job_id, verb, args.get("model"), job.origin)
        self._send(job)  # `pending`, within a second of receipt
        return job

    @staticmethod
    def _check(doc: dict[str, Any], verb: str) -> JobError | None:
        v = doc.get("v", PROTO)  # like every agent verb: a hand-typed command may leave it out
        if not isinstance(v, int) or isinstance(v, bool) or not PROTO_RANGE[0] <= v <= PROTO_RANGE[1]:
            return JobError("unsupported_version", f"v={v!r} is outside {list(PROTO_RANGE)}")
        expires = doc.get("expires_at")
        if expires is not None and (not isinstance(expires, (int, float)) or expires < time.time()):
            return JobError("expired", "expires_at is in the past")
        if not valid_model_name(doc.get("model")):
            return JobError("bad_request", f"invalid model name {doc.get('model')!r}")
        for key in ("force", "insecure"):
            if key in doc and not isinstance(doc[key], bool):
                return JobError("bad_request", f"{key} must be true or false")
        size = doc.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            return JobError("bad_request", "size must be a number of bytes")
        return None

    def _remember(self, job: Job) -> None:
        self.jobs[job.job_id] = job
        while len(self.jobs) > JOBS_REMEMBERED:
            oldest = next((k for k, j in self.jobs.items() if j.done), None)
            if oldest is None:
                break
            del self.jobs[oldest]

    async def _cmd_pull(self, doc: dict[str, Any]) -> None:
        job = self._accept(doc, JobVerb.PULL)
        if job is not None:
            job.task = asyncio.create_task(self._run(job, self._pull), name=f"job-{job.job_id}")

    async def _cmd_delete(self, doc: dict[str, Any]) -> None:
        job = self._accept(doc, JobVerb.DELETE)
        if job is not None:
            job.task = asyncio.create_task(self._run(job, self._delete), name=f"job-{job.job_id}")

    async def _cmd_cancel(self, doc: dict[str, Any]) -> None:
        job = self.jobs.get(str(doc.get("job_id")))
        if job is None or job.done:
            log.info("job.cancel for %s: %s", doc.get("job_id"), "unknown job" if job is None else "already finished")
            return
        job.cancel_requested = True
        if job.task is not None:
            job.task.cancel()

    # ---- running ---------------------------------------------------------------------------
    async def _run(self, job: Job, work: Work) -> None:
        if job.verb != JobVerb.PULL:
            await self._work(job, work)
            return
        try:
            async with self._slots:  # queued (`pending`) until a pull slot frees; held until the job ended
                await self._work(job, work)
        except asyncio.CancelledError:  # cancelled while still queued
            if self._stopping or not job.cancel_requested or job.done:
                raise
            self._end(job, JobStatus.CANCELLED, JobError("cancelled", "cancelled by job.cancel before it started"))

    async def _work(self, job: Job, work: Work) -> None:
        try:
            self._start(job)
            await work(job)
            await self._publish_models()
            self._end(job, JobStatus.COMPLETED)
        except JobError as e:
            await self._publish_models()
            self._end(job, JobStatus.FAILED, e)
        except asyncio.CancelledError:
            if self._stopping or not job.cancel_requested:
                raise
            await self._publish_models()
            self._end(job, JobStatus.CANCELLED, JobError("cancelled", "cancelled by job.cancel"))
        except Exception as e:  # a bug must fail the job loudly, not leave it running forever
            log.exception("job %s failed", job.job_id)
            self._end(job, JobStatus.FAILED, JobError("internal", f"{e.__class__.__name__}: {e}"))

    def _start(self, job: Job) -> None:
        job.status, job.started_at, job.phase = JobStatus.IN_PROGRESS, time.time(), "starting"
        self._send(job)

    def _end(self, job: Job, status: JobStatus, error: JobError | None = None) -> None:
        job.status, job.finished_at = status, time.time()
        job.error_code = error.code if error else None
        # specs/mqtt.md: a rejection's message starts with its reason code
        job.error = (f"{error.code}: {error.message}" if status == JobStatus.REJECTED else error.message) if error else None
        if status == JobStatus.COMPLETED:
            job.progress, job.eta = 1.0, 0.0
        log.log(logging.WARNING if status in (JobStatus.FAILED, JobStatus.REJECTED) else logging.INFO, "job %s %s%s",
                job.job_id, status, f": {error.message}" if error else "")
        self._send(job)

    async def _publish_models(self) -> None:
        """The installed-models snapshot goes out before the job's final status (specs/mqtt.md)."""
        await self.publisher.refresh()

    def _disk_free(self) -> int | None:
        disk = collect.soft(lambda: collect._disk(self.disk_path))
        return disk.free if disk else None

    def _no_room(self, needed: int, model: str) -> JobError | None:
        free = self._disk_free()
        if free is None or needed <= free:
            return None
        return JobError("disk_full", f"insufficient storage: {model} needs {human_bytes(needed)} more, only "
                                     f"{human_bytes(free)} free in {self.disk_path}")

    async def _installed(self) -> dict[str, dict[str, Any]]:
        try:
            resp = await self._ollama.get("/api/tags", timeout=self.cfg.ollama_timeout + 5)
            resp.raise_for_status()
            return {normalize(m["name"]): m for m in resp.json().get("models") or []}
        except (httpx.HTTPError, ValueError) as e:
            raise JobError("ollama_down", f"Ollama at {self.cfg.ollama_url} is not answering: "
                                          f"{e.__class__.__name__}: {e}") from None

    async def _pull(self, job: Job) -> None:
        model = job.args["model"]
        have = (await self._installed()).get(normalize(model))
        if have is not None and not job.args.get("force"):
            size = int(have.get("size") or 0) or None
            job.phase, job.completed, job.total = "already installed", size, size
            return
        if isinstance(job.args.get("size"), int) and (err := self._no_room(job.args["size"], model)):
            raise err
        job.phase = "pulling manifest"
        self._send(job)
        rate = Rate()
        body: dict[str, Any] = {"model": model, "stream": True}
        if job.args.get("insecure"):
            body["insecure"] = True
        try:
            timeout = httpx.Timeout(PULL_CONNECT_TIMEOUT, read=PULL_READ_TIMEOUT)
            async with self._ollama.stream("POST", "/api/pull", json=body, timeout=timeout) as resp:
                if resp.status_code >= 400:
                    text = _error_text(await resp.aread())
                    if resp.status_code == 400:
                        raise JobError("bad_request", text)
                    raise _pull_error(f"HTTP {resp.status_code}: {text}")
                async for line in resp.aiter_lines():
                    if line.strip() and self._progress_line(job, rate, json.loads(line)):
                        return
        except httpx.ConnectError as e:
            raise JobError("ollama_down", f"Ollama at {self.cfg.ollama_url} is not answering: {e}") from None
        except httpx.TimeoutException:
            raise JobError("pull_failed", f"Ollama sent nothing for {PULL_READ_TIMEOUT:g} s") from None
        except httpx.HTTPError as e:
            raise JobError("pull_failed", f"connection to Ollama lost during the pull: "
                                          f"{e.__class__.__name__}: {e}") from None
        except ValueError as e:
            raise JobError("pull_failed", f"Ollama sent a line that is not JSON: {e}") from None
        raise JobError("pull_failed", "Ollama's pull stream ended without `success`")

    def _progress_line(self, job: Job, rate: Rate, doc: dict[str, Any]) -> bool:
        """Apply one line of Ollama's pull stream; True at `success`."""
        if doc.get("error"):
            raise _pull_error(str(doc["error"]))
        status = str(doc.get("status") or "")
        digest = doc.get("digest")
        if isinstance(digest, str) and digest:
            total, done = int(doc.get("total") or 0), int(doc.get("completed") or 0)  # omitted while 0
            new = digest not in job.layers
            job.layers[digest] = [done, total]
            if new and (err := self._no_room(sum(t - c for c, t in job.layers.values()), job.args["model"])):
                raise err
            # Ollama announces a layer's size only when it starts on it, so the fraction is of the layers
            # seen so far (the weights come first and are nearly all of the bytes); 1.0 means done
            job.completed = sum(c for c, _ in job.layers.values())
            job.total = sum(t for _, t in job.layers.values()) or None
            job.progress = round(min(job.completed / job.total, PROGRESS_BEFORE_SUCCESS), 4) if job.total else 0.0
            rate.add(job.completed)
            speed = rate.speed()
            job.speed = round(speed, 1) if speed is not None else None
            job.eta = round((job.total - job.completed) / speed, 1) if speed and job.total else None
            job.digest = digest
        if status:
            job.phase = status
        job.dirty = True
        if job.completed and not job.bytes_seen:
            job.bytes_seen = True
            self._send(job)  # the first bytes: news, like a status change (not throttled)
        return status == "success"

    async def _delete(self, job: Job) -> None:
        model = job.args["model"]
        job.phase = "deleting"
        try:
            resp = await self._ollama.request("DELETE", "/api/delete", json={"model": model}, timeout=DELETE_TIMEOUT)
        except httpx.HTTPError as e:
            raise JobError("ollama_down", f"Ollama at {self.cfg.ollama_url} is not answering: "
                                          f"{e.__class__.__name__}: {e}") from None
        if resp.status_code == 404:
            raise JobError("not_found", f"model {model!r} is not installed")
        if resp.status_code >= 400:
            raise JobError("delete_failed", f"HTTP {resp.status_code}: {_error_text(resp.content)}")
        job.phase = "deleted"
