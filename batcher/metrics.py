"""Every Prometheus metric batcher exposes: names, help and buckets in one place, on an
injected registry so tests never share state. Labelled series are created up front so a
dashboard sees zeros, not gaps, before the first error."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# No `*_created` series: no panel or alert reads them and they double the series count.
disable_created_metrics()  # type: ignore[no-untyped-call]

ROUTES = (
    "/",
    "/healthz",
    "/readyz",
    "/predict",
    "/predict/batch",
    "/intents",
    "/metrics",
    "/openapi.json",
    "/docs",
    "other",
)
PREDICT_ROUTES = ("/predict", "/predict/batch")
STATUSES = ("200", "400", "401", "403", "404", "405", "408", "413", "422", "429", "500", "503", "504")
REJECT_REASONS = ("queue_full", "deadline", "disconnected", "invalid", "model_error", "not_ready", "unauthorized")

# Millisecond-scale latencies: 0.5 ms to 10 s.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
TOKENIZE_BUCKETS_S = (0.000005, 0.00001, 0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.005)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    """The metric families, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        if process:
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "batcher_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "batcher_request_duration_seconds",
            "Time from receiving a request to its response being ready.",
            ["route"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "batcher_queue_wait_seconds",
            "Time from admission to the start of the request's model run.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference = Histogram(
            "batcher_inference_duration_seconds",
            "Wall time of one model run (one batch), padding included.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.tokenize = Histogram(
            "batcher_tokenize_duration_seconds",
            "Time to build and tokenize one request's text.",
            buckets=TOKENIZE_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "batcher_batch_size", "Requests in one model run.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.padding_ratio = Histogram(
            "batcher_batch_padding_ratio",
            "Share of padded positions in one model run's input.",
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Counter(
            "batcher_batch_tokens", "Token positions sent to the model, real or padding.", ["kind"], registry=r
        )
        self.queue_depth = Gauge("batcher_queue_depth", "Requests admitted and waiting for a model run.", registry=r)
        self.queue_capacity = Gauge(
            "batcher_queue_capacity", "max_queue_size: queue depth that triggers 429.", registry=r
        )
        self.inflight_batches = Gauge(
            "batcher_inflight_batches", "Model runs in progress or handed to a worker.", registry=r
        )
        self.model_busy = Counter(
            "batcher_model_busy_seconds",
            "Summed wall time of model runs; its rate is the model's busy share.",
            registry=r,
        )
        self.rejected = Counter(
            "batcher_rejected",
            "Requests refused or dropped without an answer from the model, by reason.",
            ["reason"],
            registry=r,
        )
        self.ready = Gauge(
            "batcher_ready", "1 when the server accepts predictions (loaded, warm, not draining).", registry=r
        )
        self.model_info = Info("batcher_model", "The model being served and the settings it runs with.", registry=r)
        if process:
            r.register(LoopThreadCPU())
        for route in ROUTES:
            self.request_duration.labels(route)
        for route in PREDICT_ROUTES:
            for status in STATUSES:
                self.requests.labels(route, status)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for kind in ("real", "padding"):
            self.batch_tokens.labels(kind)
        self._answer_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}

    def answered(self, route: str, status: int, seconds: float) -> None:
        """Count and time one answer. The labelled children are looked up once per (route,
        status) and kept: labels() takes a lock and builds a key on every call."""
        children = self._answer_children.get((route, status))
        if children is None:
            children = (self.requests.labels(route, str(status)), self.request_duration.labels(route))
            self._answer_children[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def describe_model(self, info: Mapping[str, str]) -> None:
        """Publish the model and its settings (dots become underscores in label names)."""
        self.model_info.info({key.replace(".", "_"): value for key, value in info.items()})


class LoopThreadCPU(Collector):
    """CPU seconds used by the thread that created the metrics: the event loop's thread.
    Its rate per request is the loop's cost per request, the budget that bounds
    throughput on a small CPU. Read from /proc, so it is absent where /proc is."""

    def __init__(self) -> None:
        self._stat = Path(f"/proc/self/task/{threading.get_native_id()}/stat")
        self._ticks = _clock_ticks()

    def collect(self) -> Iterator[CounterMetricFamily]:
        try:
            fields = self._stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return
        seconds = (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime
        yield CounterMetricFamily(
            "batcher_event_loop_cpu_seconds", "CPU time of the event-loop thread (user + system).", value=seconds
        )


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100
