"""Download progress: speed/ETA figures, a terminal bar (TTY) or plain log lines, and throttled job status.

The same numbers go three ways: a bar on an interactive stderr, log lines without escape codes when
stderr is a file or a journal, and a retained `jobs/<id>` document over MQTT for the dashboard.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from ollama_fleet.contract.jobs import JobStatus
from ollama_fleet.contract.protocol import PROTO

log = logging.getLogger("fleet.agent.progress")

# module level so tests can shrink them
BAR_INTERVAL = 0.1  # seconds between redraws of the terminal bar
LOG_INTERVAL = 5.0  # seconds between progress log lines when stderr is not a terminal
SPEED_WINDOW = 5.0  # seconds of history behind the speed figure
JOB_MIN_INTERVAL = 1.0  # a job status goes out at most this often while running...
JOB_MAX_INTERVAL = 5.0  # ...and at least this often, even when no byte arrived (stall visible)
BAR_WIDTH = 28

Clock = Callable[[], float]


class Meter:
    """Bytes done of total, with speed over a sliding window and an ETA."""

    def __init__(self, total: int | None = None, completed: int = 0, clock: Clock = time.monotonic) -> None:
        self.total = total
        self.completed = completed
        self.clock = clock
        self.started = clock()
        self._samples: collections.deque[tuple[float, int]] = collections.deque([(self.started, completed)])
        self._updated = False

    def update(self, completed: int, total: int | None = None) -> None:
        now = self.clock()
        if not self._updated:  # a resumed download starts at its offset: that is not speed
            self._updated = True
            self._samples = collections.deque([(now, completed)])
        self.completed = completed
        if total is not None:
            self.total = total
        if now - self._samples[-1][0] >= 0.05 or completed < self._samples[-1][1]:
            self._samples.append((now, completed))
        while len(self._samples) > 2 and now - self._samples[1][0] >= SPEED_WINDOW:
            self._samples.popleft()

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.completed / self.total))

    @property
    def speed(self) -> float:
        (t0, c0), now = self._samples[0], self.clock()
        if now - t0 <= 0 or self.completed < c0:
            return 0.0
        return (self.completed - c0) / (now - t0)

    @property
    def eta(self) -> float | None:
        speed = self.speed
        if not self.total or speed <= 0:
            return None
        return max(0.0, (self.total - self.completed) / speed)

    def figures(self) -> dict[str, Any]:
        eta = self.eta
        return {
            "progress": round(self.fraction, 4) if self.fraction is not None else None,
            "completed": self.completed,
            "total": self.total,
            "speed": round(self.speed, 1),
            "eta": round(eta, 1) if eta is not None else None,
        }


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = int(seconds + 0.5)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ConsoleProgress:
    """A bar with percent, speed and ETA on a terminal; plain, rate-limited log lines otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None, tty: bool | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.log = logger or log
        self._last = 0.0
        self._drawn = False

    def update(self, meter: Meter, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < (BAR_INTERVAL if self.tty else LOG_INTERVAL):
            return
        self._last = now
        if self.tty:
            self.stream.write("\r" + self.bar_line(meter) + "\x1b[K")
            self.stream.flush()
            self._drawn = True
        else:
            self.log.info("%s", self.log_line(meter))

    def close(self, meter: Meter, ok: bool = True) -> None:
        if self.tty:
            if self._drawn or ok:
                self.stream.write("\r" + self.bar_line(meter) + "\x1b[K\n")
                self.stream.flush()
        elif ok:
            self.log.info("%s", self.log_line(meter))

    def bar_line(self, meter: Meter) -> str:
        frac = meter.fraction
        filled = int(BAR_WIDTH * (frac or 0.0))
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        pct = f"{frac * 100:5.1f}%" if frac is not None else "  ?  %"
        return (f"{self.label} [{bar}] {pct} {human_bytes(meter.completed)}/{human_bytes(meter.total)} "
                f"{human_bytes(meter.speed)}/s ETA {human_duration(meter.eta)}")

    def log_line(self, meter: Meter) -> str:
        frac = meter.fraction
        pct = f"{frac * 100:.0f}%" if frac is not None else "?%"
        return (f"{self.label}: {pct} ({human_bytes(meter.completed)} of {human_bytes(meter.total)}), "
                f"{human_bytes(meter.speed)}/s, ETA {human_duration(meter.eta)}")


class JobReport:
    """The retained status document of one job (`jobs/<job_id>`), throttled for the broker.

    `emit` receives each document; it must not block (the agent queues it until connected).
    """

    def __init__(self, job_id: str, verb: str, emit: Callable[[dict[str, Any]], None],
                 clock: Clock = time.monotonic, **extra: Any) -> None:
        self.job_id, self.verb, self.emit, self.clock = job_id, verb, emit, clock
        self.extra = extra
        self.seq = 0
        self.status: JobStatus = JobStatus.IN_PROGRESS
        self.phase: str | None = None
        self.error: str | None = None
        self._figures: dict[str, Any] = {"progress": 0.0, "completed": 0, "total": None, "speed": 0.0,
                                         "eta": None}
        self._last_sent = float("-inf")
        self._dirty = True

    @property
    def done(self) -> bool:
        return self.status.terminal

    def document(self) -> dict[str, Any]:
        return {"v": PROTO, "job_id": self.job_id, "verb": self.verb, "status": self.status,
                "phase": self.phase, **self._figures, "error": self.error, "seq": self.seq,
                "ts": time.time(), **self.extra}

    def _send(self) -> None:
        self.seq += 1
        self._last_sent = self.clock()
        self._dirty = False
        self.emit(self.document())

    def start(self, phase: str | None = None) -> None:
        self.phase = phase
        self._send()

    def progress(self, meter: Meter | None = None, phase: str | None = None) -> None:
        """Record new figures; sent now only if JOB_MIN_INTERVAL has passed since the last one."""
        if meter is not None:
            self._figures = meter.figures()
        if phase is not None:
            self.phase = phase  # also throttled: keepalive() sends it within JOB_MIN_INTERVAL
        self._dirty = True
        if self.clock() - self._last_sent >= JOB_MIN_INTERVAL:
            self._send()

    def tick(self) -> None:
        """Called periodically: re-sends pending figures, or the same ones after JOB_MAX_INTERVAL."""
        if self.done:
            return
        since = self.clock() - self._last_sent
        if (self._dirty and since >= JOB_MIN_INTERVAL) or since >= JOB_MAX_INTERVAL:
            self._send()

    def finish(self, ok: bool, error: str | None = None, meter: Meter | None = None) -> None:
        if meter is not None:
            self._figures = meter.figures()
        if ok:
            self._figures["progress"] = 1.0
            self._figures["eta"] = 0.0
        self.status = JobStatus.COMPLETED if ok else JobStatus.FAILED
        self.error = error
        self._send()

    async def keepalive(self) -> None:
        """Run beside the job: guarantees a status at least every JOB_MAX_INTERVAL until it is done."""
        while not self.done:
            await asyncio.sleep(min(JOB_MIN_INTERVAL, JOB_MAX_INTERVAL) / 2)
            self.tick()
