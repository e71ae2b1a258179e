"""Every Prometheus metric batcher exposes: names, help and buckets in one place, on an
injected registry so tests never share state. Labelled series are created up front so a
dashboard sees zeros, not gaps, before the first error.

With several worker processes (server.workers > 1) prometheus-client's multiprocess mode
is on (the parent sets PROMETHEUS_MULTIPROC_DIR before it starts them): every counter and
histogram is summed over the workers, whichever one answers the scrape; each gauge says
how (its `multiprocess_mode`: queue depths and capacities summed, readiness the minimum);
process and event-loop CPU and memory are summed too, and also kept per worker in the
`batcher_worker_*` gauges (label `worker`), refreshed every second by each worker. A single
process exports those gauges too, as worker 0, read at each scrape: the dashboard's
per-worker panels then show the same series in every layout.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

# No `*_created` series: no panel or alert reads them and they double the series count.
disable_created_metrics()  # type: ignore[no-untyped-call]

PREDICT_ROUTES = (
    "/predict",
    "/predict/batch",
    "/models/{name}/predict",
    "/models/{name}/predict/batch",
    "/v2/models/{name}/infer",
)
ADMIN_ROUTES = ("/models/{name}/reload",)
ROUTES = (
    *PREDICT_ROUTES,
    *ADMIN_ROUTES,
    "/",
    "/healthz",
    "/readyz",
    "/intents",
    "/models",
    "/models/{name}/intents",
    "/v2",
    "/v2/health/live",
    "/v2/health/ready",
    "/v2/models/{name}",
    "/v2/models/{name}/ready",
    "/metrics",
    "/openapi.json",
    "/docs",
    "other",
)
STATUSES = ("200", "400", "401", "403", "404", "405", "408", "413", "417", "422", "429", "500", "503", "504")
RELOAD_RESULTS = ("reloaded", "unchanged", "failed")
REJECT_REASONS = (
    "queue_full",
    "predicted_late",
    "deadline",
    "disconnected",
    "invalid",
    "model_error",
    "not_ready",
    "unauthorized",
)
PRIORITY_NAMES = ("high", "normal", "low")
"""batcher/promises.py's priorities, by index."""

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
TOKENIZE_BUCKETS_S = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
WORKER_GAUGES = (
    ("batcher_worker_cpu_seconds", "CPU time of one worker process."),
    ("batcher_worker_event_loop_cpu_seconds", "CPU time of one worker's event-loop thread."),
    ("batcher_worker_resident_memory_bytes", "Resident memory of one worker process."),
)
"""One process's own CPU, event-loop CPU and memory, label `worker`, in that order."""
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST


def multiprocess() -> bool:
    """Whether this process is one of several workers sharing their metrics through files."""
    return MULTIPROCESS_DIR in os.environ


class Metrics:
    """The metric families, registered on `registry`. `worker` labels this process's own
    CPU and memory gauges (0 when it serves alone)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True, worker: int = 0) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess()
        self.worker = str(worker)
        if process and not self.multiprocess:
            ProcessCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "batcher_requests",
            "HTTP requests answered, by route, status and the model they asked for ('' for none).",
            ["route", "status", "model"],
            registry=r,
        )
        self.request_duration = Histogram(
            "batcher_request_duration_seconds",
            "Time from receiving a request to its response being ready.",
            ["route", "model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        by_model = ["model"]
        self.queue_wait = Histogram(
            "batcher_queue_wait_seconds",
            "Time from admission to the start of the request's model run.",
            buckets=LATENCY_BUCKETS_S,
            labelnames=by_model,
            registry=r,
        )
        self.priority_wait = Histogram(
            "batcher_priority_queue_wait_seconds",
            "Time from admission to the start of the request's model run, by the request's priority.",
            buckets=LATENCY_BUCKETS_S,
            labelnames=["model", "priority"],
            registry=r,
        )
        self.priority_requests = Counter(
            "batcher_priority_requests",
            "Prediction rows admitted, or refused at the door (queue_full or predicted_late), by priority.",
            ["model", "priority", "outcome"],
            registry=r,
        )
        self.inference = Histogram(
            "batcher_inference_duration_seconds",
            "Wall time of one model run (one batch), padding included.",
            buckets=LATENCY_BUCKETS_S,
            labelnames=by_model,
            registry=r,
        )
        self.tokenize = Histogram(
            "batcher_tokenize_duration_seconds",
            "Time to tokenize: one request's text on the event loop, or (batching.tokenize_on) "
            "one batch's texts on a model thread.",
            buckets=TOKENIZE_BUCKETS_S,
            labelnames=by_model,
            registry=r,
        )
        self.batch_size = Histogram(
            "batcher_batch_size",
            "Requests in one model run.",
            buckets=BATCH_SIZE_BUCKETS,
            labelnames=by_model,
            registry=r,
        )
        self.padding_ratio = Histogram(
            "batcher_batch_padding_ratio",
            "Share of padded positions in one model run's input.",
            buckets=RATIO_BUCKETS,
            labelnames=by_model,
            registry=r,
        )
        self.batch_tokens = Counter(
            "batcher_batch_tokens", "Token positions sent to the model, real or padding.", ["model", "kind"], registry=r
        )
        self.queue_depth = Gauge(
            "batcher_queue_depth",
            "Requests admitted and waiting for a model run (summed over workers).",
            multiprocess_mode="livesum",
            labelnames=by_model,
            registry=r,
        )
        self.queue_capacity = Gauge(
            "batcher_queue_capacity",
            "max_queue_size: queue depth that triggers 429 (summed over workers).",
            multiprocess_mode="livesum",
            labelnames=by_model,
            registry=r,
        )
        self.inflight_batches = Gauge(
            "batcher_inflight_batches",
            "Model runs in progress or handed to a model thread (summed over workers).",
            multiprocess_mode="livesum",
            labelnames=by_model,
            registry=r,
        )
        self.model_instances = Gauge(
            "batcher_model_instances",
            "Model runs that may be in flight at once, batching.instances (summed over workers): "
            "rate(batcher_model_busy_seconds_total) over it is the model's busy share.",
            multiprocess_mode="livesum",
            labelnames=by_model,
            registry=r,
        )
        self.model_busy = Counter(
            "batcher_model_busy_seconds",
            "Summed wall time of model runs; its rate is the model's busy share.",
            labelnames=by_model,
            registry=r,
        )
        self.rejected = Counter(
            "batcher_rejected",
            "Requests refused or dropped without an answer from the model, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self.coalesced = Counter(
            "batcher_coalesced_rows",
            "Requests that shared a waiting twin's row of a batch (batching.coalesce) instead of a row of their own.",
            labelnames=by_model,
            registry=r,
        )
        self.lone_runs = Counter(
            "batcher_lone_runs",
            "Rows run alone on the session using every core (batching.lone_threads): the model was idle and "
            "recent arrivals had found the server empty, a lone client.",
            labelnames=by_model,
            registry=r,
        )
        self.held_refusals = Counter(
            "batcher_held_refusals",
            "429s held back until the Retry-After of a client that came back before it (a retry storm).",
            labelnames=by_model,
            registry=r,
        )
        self.demoted = Counter(
            "batcher_demoted_requests",
            "Requests taken one priority lower because their connection resent a refused request "
            "before its Retry-After twice in a row and has not since waited as told (a retry storm).",
            labelnames=by_model,
            registry=r,
        )
        self.cache_requests = Counter(
            "batcher_cache_requests",
            "Predictions looked up in the response cache (cache.max_entries > 0), by result.",
            ["model", "result"],
            registry=r,
        )
        self.ready = Gauge(
            "batcher_ready",
            "1 when the model accepts predictions (loaded, warm, last run good, not draining); "
            "with several workers, 1 only when every live worker's is.",
            multiprocess_mode="livemin",
            labelnames=by_model,
            registry=r,
        )
        self.model_reloads = Counter(
            "batcher_model_reloads",
            "Model reloads asked for by SIGHUP, by result: reloaded (a new version serves), unchanged, "
            "or failed (the old version keeps serving; the log says why).",
            ["model", "result"],
            registry=r,
        )
        self.prediction_log_dropped = Counter(
            "batcher_prediction_log_dropped",
            "Prediction log lines (log.predictions) that could not be written to log.predictions_file "
            "(disk full, file unwritable) and were dropped; the answers were not affected.",
            registry=r,
        )
        self.worker_restarts = Counter(
            "batcher_worker_restarts",
            "Worker processes restarted after exiting unasked (server.workers > 1).",
            registry=r,
        )
        self._model_info: Gauge | None = None
        self._model_info_labels: dict[str, dict[str, str]] = {}
        self._ready_now: dict[str, Callable[[], bool]] = {}
        self._models: dict[str, ModelMetrics] = {}
        self._usage: ProcessUsage | None = None
        if process and not self.multiprocess:
            loop_cpu = LoopThreadCPU()
            r.register(loop_cpu)
            r.register(WorkerUsage(loop_cpu, self.worker))
        elif process:
            self._usage = ProcessUsage(r, self.worker)
        self._answer_children: dict[tuple[str, int, str], tuple[Counter, Histogram]] = {}

    def for_model(self, name: str) -> ModelMetrics:
        """The series of one model (created once, zeros included, so dashboards see no gaps)."""
        if name not in self._models:
            self._models[name] = ModelMetrics(self, name)
            for route in ROUTES:
                self.request_duration.labels(route, name)
            for route in PREDICT_ROUTES:
                for status in STATUSES:
                    self.requests.labels(route, status, name)
            for result in RELOAD_RESULTS:
                self.model_reloads.labels(name, result)
        return self._models[name]

    def answered(self, route: str, status: int, seconds: float, model: str = "") -> None:
        """Count and time one answer. The labelled children are looked up once per (route,
        status, model) and kept: labels() takes a lock and builds a key on every call."""
        children = self._answer_children.get((route, status, model))
        if children is None:
            children = (self.requests.labels(route, str(status), model), self.request_duration.labels(route, model))
            self._answer_children[(route, status, model)] = children
        children[0].inc()
        children[1].observe(seconds)

    def describe_model(self, name: str, info: Mapping[str, str]) -> None:
        """Publish a model, its version and settings as the labels of batcher_model_info, value
        1 (dots become underscores in label names); a reloaded model's old series goes."""
        labels = {"model": name, **{key.replace(".", "_"): value for key, value in info.items()}}
        if self._model_info is None:
            self._model_info = Gauge(
                "batcher_model_info",
                "The model being served, its version and the settings it runs with.",
                list(labels),
                registry=self.registry,
                multiprocess_mode="max",
            )
        previous = self._model_info_labels.get(name)
        if previous is not None and previous != labels:
            self._model_info.remove(*previous.values())
        self._model_info.labels(**labels).set(1)
        self._model_info_labels[name] = labels

    def track_ready(self, name: str, ready: Callable[[], bool]) -> None:
        """batcher_ready{model} follows `ready()`: read at every scrape in one process,
        refreshed every second (`refresh`) when several workers share their metrics."""
        self._ready_now[name] = ready
        if not self.multiprocess:
            self.ready.labels(name).set_function(lambda: float(ready()))
        self.refresh()

    def refresh(self) -> None:
        """Update what one process cannot compute at another's scrape (multiprocess mode)."""
        if self.multiprocess:
            for name, ready in self._ready_now.items():
                self.ready.labels(name).set(float(ready()))
        if self._usage is not None:
            self._usage.update()

    def exposition(self) -> bytes:
        """The text format of every metric: this process's, or all workers' summed."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # its __init__ is unannotated
        return generate_latest(merged)


class ModelMetrics:
    """One model's labelled series, looked up once: what its batcher and handlers record."""

    def __init__(self, metrics: Metrics, name: str) -> None:
        self.name = name
        self.queue_wait = metrics.queue_wait.labels(name)
        self.inference = metrics.inference.labels(name)
        self.tokenize = metrics.tokenize.labels(name)
        self.batch_size = metrics.batch_size.labels(name)
        self.padding_ratio = metrics.padding_ratio.labels(name)
        self.real_tokens = metrics.batch_tokens.labels(name, "real")
        self.padding_tokens = metrics.batch_tokens.labels(name, "padding")
        self.queue_depth = metrics.queue_depth.labels(name)
        self.queue_capacity = metrics.queue_capacity.labels(name)
        self.inflight_batches = metrics.inflight_batches.labels(name)
        self.model_instances = metrics.model_instances.labels(name)
        self.model_busy = metrics.model_busy.labels(name)
        self.rejected = {reason: metrics.rejected.labels(name, reason) for reason in REJECT_REASONS}
        self.queue_wait_by_priority = [metrics.priority_wait.labels(name, p) for p in PRIORITY_NAMES]
        self.admitted_by_priority = [metrics.priority_requests.labels(name, p, "admitted") for p in PRIORITY_NAMES]
        self.refused_by_priority = [metrics.priority_requests.labels(name, p, "refused") for p in PRIORITY_NAMES]
        self.held_refusals = metrics.held_refusals.labels(name)
        self.demoted = metrics.demoted.labels(name)
        self.coalesced = metrics.coalesced.labels(name)
        self.lone_runs = metrics.lone_runs.labels(name)
        self.cache_hits = metrics.cache_requests.labels(name, "hit")
        self.cache_misses = metrics.cache_requests.labels(name, "miss")


class ProcessUsage:
    """A worker's CPU (process and event loop) and memory, for multiprocess mode, where the
    collectors that read /proc at scrape time would only describe the worker that answers
    it: totals summed over workers under the usual names, and per worker in gauges."""

    def __init__(self, registry: CollectorRegistry, worker: str) -> None:
        self._loop = LoopThreadCPU()
        self._seen = (0.0, 0.0)
        self.cpu = Counter(
            "process_cpu_seconds", "CPU time of the server's processes (user + system).", registry=registry
        )
        self.loop_cpu = Counter(
            "batcher_event_loop_cpu_seconds", "CPU time of the event-loop threads (user + system).", registry=registry
        )
        self.memory = Gauge(
            "process_resident_memory_bytes",
            "Resident memory of the server's processes (summed over workers).",
            registry=registry,
            multiprocess_mode="livesum",
        )

        self.worker_cpu, self.worker_loop_cpu, self.worker_memory = (
            Gauge(name, documentation, ["worker"], registry=registry, multiprocess_mode="livemax").labels(worker)
            for name, documentation in WORKER_GAUGES
        )

    def update(self) -> None:
        usage = _process_usage()
        if usage is None:
            return
        cpu, memory = usage
        loop = self._loop.seconds() or 0.0
        last_cpu, last_loop = self._seen
        self.cpu.inc(max(0.0, cpu - last_cpu))
        self.loop_cpu.inc(max(0.0, loop - last_loop))
        self._seen = (cpu, loop)
        self.memory.set(memory)
        self.worker_cpu.set(cpu)
        self.worker_loop_cpu.set(loop)
        self.worker_memory.set(memory)


class WorkerUsage(Collector):
    """A single process's CPU, event-loop CPU and memory under the per-worker names, as worker
    `worker`, read from /proc at each scrape (absent where /proc is)."""

    def __init__(self, loop_cpu: LoopThreadCPU, worker: str) -> None:
        self._loop_cpu = loop_cpu
        self._worker = worker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        usage, loop = _process_usage(), self._loop_cpu.seconds()
        if usage is None or loop is None:
            return
        cpu, memory = usage
        for (name, documentation), value in zip(WORKER_GAUGES, (cpu, loop, memory), strict=True):
            family = GaugeMetricFamily(name, documentation, labels=["worker"])
            family.add_metric([self._worker], value)
            yield family


class LoopThreadCPU(Collector):
    """CPU seconds used by the thread that created the metrics: the event loop's thread.
    Its rate per request is the loop's cost per request, the budget that bounds
    throughput on a small CPU. Read from /proc, so it is absent where /proc is."""

    def __init__(self) -> None:
        self._stat = Path(f"/proc/self/task/{threading.get_native_id()}/stat")
        self._ticks = _clock_ticks()

    def seconds(self) -> float | None:
        try:
            fields = self._stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / self._ticks  # utime + stime

    def collect(self) -> Iterator[CounterMetricFamily]:
        seconds = self.seconds()
        if seconds is None:
            return
        yield CounterMetricFamily(
            "batcher_event_loop_cpu_seconds", "CPU time of the event-loop thread (user + system).", value=seconds
        )


def _process_usage() -> tuple[float, int] | None:
    """This process's CPU seconds (user + system) and resident bytes, from /proc/self/stat."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS, int(fields[21]) * _PAGE_BYTES  # utime + stime; rss


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100


_TICKS = _clock_ticks()
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
