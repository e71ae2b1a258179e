"""What a load can ask of the server beyond plain requests, and what the report counts for it.

- A priority mix (`--priority-mix high=0.2,normal=0.8`): that share of requests carries
  `x-priority: high|normal|low` (the rest none); latency percentiles and statuses by priority.
- A deadline (`--deadline-ms N`): every request carries `x-deadline-ms: N`; the report counts
  the answers within it per second (goodput, client-side, from each request's schedule), the
  200s that came later, the 200s whose server-side total time (the body's `timing.total_ms`)
  exceeded it, and the 429s by error type (`predicted_late`, `queue_full`, ...). The same
  counts without sending the header (`judge_ms`) measure count-based admission at that bound.
- A retry mode (closed loop only): on every 429 a client resends the same request at once
  (`storm`, the client libraries that retry without backoff) or after the server's
  `x-retry-after-ms` / `Retry-After` (`polite`); each attempt is counted. A probe in its own
  process (loadtest/probe.py) meanwhile sends one request every `probe_interval_ms`, each on
  a new connection, and reports how long each took to be answered, whatever the status.

Whenever a mode is on, each answer is read whole (head and body), not only its status.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from hdrh.histogram import HdrHistogram

from loadtest.http import Reply

PRIORITIES = ("high", "normal", "low")
UNLABELLED = "none"
"""The requests a priority mix leaves without an `x-priority` header."""
RETRY_MODES = ("storm", "polite")
ADMISSION_MS = 10.0
"""A 429 answered within this many ms of being sent (client-side, so an upper bound of the
server's own time) counts as refused at the door."""
MAX_LATENCY_US = 120_000_000


def parse_priority_mix(text: str) -> tuple[tuple[str, float], ...]:
    """`high=0.2,normal=0.8` -> (("high", 0.2), ("normal", 0.8)); shares sum to at most 1."""
    mix: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip().lower()
        if not sep or name not in PRIORITIES:
            raise ValueError(f"expected high=SHARE,normal=SHARE,low=SHARE, not {item.strip()!r}")
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"{name}: share {value!r} is not a number") from None
        if not 0 <= share <= 1:
            raise ValueError(f"{name}: share {share:g} is not between 0 and 1")
        mix[name] = mix.get(name, 0.0) + share
    if sum(mix.values()) > 1 + 1e-9:
        raise ValueError(f"the shares add up to {sum(mix.values()):g}, more than 1")
    return tuple(mix.items())


@dataclass(frozen=True)
class Modes:
    priority_mix: tuple[tuple[str, float], ...] = ()
    deadline_ms: float | None = None
    """Sent as `x-deadline-ms` on every request, and counted against."""
    judge_ms: float | None = None
    """Counted against like a deadline, but not sent (count-based admission at that bound)."""
    retry: str | None = None
    """`storm` or `polite` (closed loop only)."""
    probe_interval_ms: float = 0.0
    """With `retry`: a probe's request every this many ms, each on a new connection (0: none)."""

    def __post_init__(self) -> None:
        if self.retry is not None and self.retry not in RETRY_MODES:
            raise ValueError(f"retry: expected one of {', '.join(RETRY_MODES)}")
        if self.deadline_ms is not None and self.deadline_ms <= 0:
            raise ValueError("deadline_ms: expected more than 0")

    @property
    def within_ms(self) -> float | None:
        """The bound answers are judged against, if any."""
        return self.deadline_ms if self.deadline_ms is not None else self.judge_ms

    def pick(self, rng: random.Random) -> str | None:
        """A request's priority by the mix (None: no header)."""
        if not self.priority_mix:
            return None
        draw = rng.random()
        for name, share in self.priority_mix:
            if draw < share:
                return name
            draw -= share
        return None

    def headers(self, priority: str | None) -> tuple[tuple[str, str], ...]:
        headers: list[tuple[str, str]] = []
        if priority is not None:
            headers.append(("x-priority", priority))
        if self.deadline_ms is not None:
            headers.append(("x-deadline-ms", f"{self.deadline_ms:g}"))
        return tuple(headers)


def error_type(reply: Reply) -> str:
    """The `error.type` of an error answer's JSON body ("unreadable" when it has none)."""
    try:
        found = orjson.loads(reply.body)["error"]["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "unreadable"
    return str(found)


def server_total_ms(body: bytes) -> float | None:
    """batcher's own total time for a request (`"timing": {..., "total_ms": N}`), None if absent."""
    start = body.find(b'"total_ms":')
    if start < 0:
        return None
    start += len(b'"total_ms":')
    stop = start
    while stop < len(body) and body[stop] not in b",}":
        stop += 1
    try:
        return float(body[start:stop])
    except ValueError:
        return None


def retry_after_s(reply: Reply) -> float:
    """How long the server asked a refused client to wait: `x-retry-after-ms`, else
    `Retry-After` (seconds); 0 when it said nothing usable."""
    for name, scale in (("x-retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = reply.header(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return 0.0


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, MAX_LATENCY_US, 3)


def _micros(seconds: float) -> int:
    return min(max(1, int(seconds * 1_000_000)), MAX_LATENCY_US)


def _ms(histogram: HdrHistogram, percentile: float) -> float | None:
    if not histogram.get_total_count():
        return None
    return round(int(histogram.get_value_at_percentile(percentile)) / 1000, 3)


@dataclass
class PriorityStats:
    statuses: Counter[str] = field(default_factory=Counter)
    latency: HdrHistogram = field(default_factory=_histogram)
    ok_latency: HdrHistogram = field(default_factory=_histogram)
    from_send: HdrHistogram = field(default_factory=_histogram)

    def summary(self, duration_s: float) -> dict[str, Any]:
        requests = sum(self.statuses.values())
        return {
            "requests": requests,
            "statuses": dict(sorted(self.statuses.items())),
            "ok_rps": round(self.statuses.get("200", 0) / duration_s, 2),
            "refused_share": round(self.statuses.get("429", 0) / requests, 5) if requests else None,
            "p50_ms": _ms(self.latency, 50),
            "p90_ms": _ms(self.latency, 90),
            "p99_ms": _ms(self.latency, 99),
            "p999_ms": _ms(self.latency, 99.9),
            "max_ms": round(int(self.latency.get_max_value()) / 1000, 3) if requests else None,
            "ok_p50_ms": _ms(self.ok_latency, 50),
            "ok_p99_ms": _ms(self.ok_latency, 99),
            "ok_max_ms": round(int(self.ok_latency.get_max_value()) / 1000, 3)
            if self.ok_latency.get_total_count()
            else None,
            "p99_ms_from_send": _ms(self.from_send, 99),
        }


@dataclass
class ModeStats:
    """What one measured step counted for its modes."""

    modes: Modes
    by_priority: dict[str, PriorityStats] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    """429s by the error type of their body."""
    errors: Counter[str] = field(default_factory=Counter)
    """Other non-200 answers, by status and error type (`504 deadline_exceeded`)."""
    refused_at_door: int = 0
    within: int = 0
    late_ok: int = 0
    server_late_ok: int = 0
    server_time_unknown: int = 0
    polite_waits: int = 0
    polite_wait_s: float = 0.0
    probe: dict[str, Any] | None = None

    def record(
        self, priority: str | None, status: str, reply: Reply | None, latency_s: float, from_send_s: float
    ) -> None:
        if self.modes.priority_mix:
            stats = self.by_priority.get(priority or UNLABELLED)
            if stats is None:
                stats = self.by_priority[priority or UNLABELLED] = PriorityStats()
            stats.statuses[status] += 1
            stats.latency.record_value(_micros(latency_s))
            stats.from_send.record_value(_micros(from_send_s))
            if status == "200":
                stats.ok_latency.record_value(_micros(latency_s))
        if reply is None:
            return
        if reply.status == 429:
            self.refused[error_type(reply)] += 1
            if from_send_s * 1000 <= ADMISSION_MS:
                self.refused_at_door += 1
        elif reply.status != 200:
            self.errors[f"{reply.status} {error_type(reply)}"] += 1
        bound = self.modes.within_ms
        if bound is None or reply.status != 200:
            return
        if latency_s * 1000 <= bound:
            self.within += 1
        else:
            self.late_ok += 1
        if self.modes.deadline_ms is not None:
            total = server_total_ms(reply.body)
            if total is None:
                self.server_time_unknown += 1
            elif total > self.modes.deadline_ms:
                self.server_late_ok += 1

    def waited(self, seconds: float) -> None:
        self.polite_waits += 1
        self.polite_wait_s += seconds

    def summary(self, duration_s: float, ok: int) -> dict[str, Any]:
        modes = self.modes
        out: dict[str, Any] = {
            "refused_by_type": dict(sorted(self.refused.items())),
            "refused_at_door": self.refused_at_door,
            "admission_ms": ADMISSION_MS,
            "errors_by_type": dict(sorted(self.errors.items())),
        }
        if modes.priority_mix:
            out["priority_mix"] = dict(modes.priority_mix)
            order = [*PRIORITIES, UNLABELLED]
            out["by_priority"] = {
                name: self.by_priority[name].summary(duration_s) for name in order if name in self.by_priority
            }
        if modes.within_ms is not None:
            out["deadline"] = {
                "deadline_ms": modes.deadline_ms,
                "judged_ms": modes.within_ms,
                "sent": modes.deadline_ms is not None,
                "within": self.within,
                "goodput_rps": round(self.within / duration_s, 2),
                "late_200": self.late_ok,
                "server_late_200": self.server_late_ok if modes.deadline_ms is not None else None,
                "server_time_unknown": self.server_time_unknown if modes.deadline_ms is not None else None,
            }
        if modes.retry is not None:
            out["retry"] = {
                "mode": modes.retry,
                "ok_rps": round(ok / duration_s, 2),
                "polite_waits": self.polite_waits,
                "polite_wait_mean_ms": round(self.polite_wait_s / self.polite_waits * 1000, 3)
                if self.polite_waits
                else None,
                "probe": self.probe,
            }
        return out
