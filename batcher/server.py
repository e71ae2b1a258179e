"""One server process: signals, the listening socket, serving, and the shutdown sequence.

On SIGTERM or SIGINT, in order:
1. at once, in the signal's own callback: /readyz fails and every answer closes its
   connection (load balancers and keep-alive clients go elsewhere);
2. predictions are still admitted for `server.drain_delay_s`, while load balancers and
   Kubernetes endpoints stop routing here; then new ones get 503;
3. everything admitted is answered within `server.shutdown_timeout_s` (503 for what is
   left then, a hung model run included);
4. the listener stops taking new connections, the ones the kernel had already queued are
   accepted and answered, and only then is it closed: no client that connected is cut;
5. exit 0, within drain_delay_s + shutdown_timeout_s and a second or two.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import time

from aiohttp import web

from batcher.application import create_app, create_metrics_app, drain, server_options
from batcher.config import Settings
from batcher.errors import StartupCancelled
from batcher.fastpath import Runner
from batcher.handlers import METRICS, MODELS
from batcher.listener import empty_backlog, open_listener, watch_open_files
from batcher.metrics import Metrics
from batcher.prediction_log import count_drops
from batcher.runtime import Models
from batcher.worker import Model

log = logging.getLogger("batcher")
# The cyclic GC's first-generation threshold (CPython's default: 700). Under a 3x overload the
# default ran ~14 young collections a second, each stopping the loop for up to 10-50 ms
# while it walked the objects of every request in flight; at 10,000 the collector ran about
# once every 2 s and the p99 of the 429s fell from ~50 ms to ~9 ms (2 cores, RELIABILITY.md).
GC_GEN0_THRESHOLD = 10_000
OPEN_FILES_CAP = 1 << 20  # Linux's default fs.nr_open: the most a process may ask for
# After the drain every admitted request has its answer; aiohttp gets this long to write
# them out before it closes the connections (its own 0 would mean "wait for ever").
RESPONSE_GRACE_S = 1.0


class Shutdown:
    """Where the signals lead: `stop` is set by the first SIGTERM/SIGINT (again: ignored);
    SIGHUP is left to `on_hangup`."""

    def __init__(self, models: Models, metrics: Metrics) -> None:
        self.models = models
        self.metrics = metrics
        self.stop = asyncio.Event()
        self.signalled = 0.0
        self.signal_name = "SIGTERM"
        self._tasks: set[asyncio.Task[None]] = set()

    async def reload(self) -> None:
        """SIGHUP: re-read every model's bundle; what changed is swapped in, the rest left be.
        A bundle that cannot be read at all (its directory gone) fails that model's reload
        only: the old version keeps serving, one error line says why, and it is counted."""
        names = [runtime.name for runtime in self.models.loaded()]
        log.info("SIGHUP: reloading %d models", len(names))
        for name in names:
            try:
                result = await self.models.reload(name)
            except Exception as exc:  # a task's error would otherwise surface as a traceback at exit
                runtime = self.models.find(name)
                version = runtime.version if runtime is not None else "none"
                log.error("reloading model %s failed; version %s keeps serving: %s", name, version, exc)
                result = {"model": name, "status": "failed", "version": version, "reason": str(exc)}
            self.metrics.model_reloads.labels(name, str(result["status"])).inc()
            log.info("SIGHUP: %s", " ".join(f"{key}={value}" for key, value in result.items()))

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(signum, self.on_signal, signum)

    def on_signal(self, signum: signal.Signals) -> None:
        if signum == signal.SIGHUP:
            if not self.stop.is_set():
                task = asyncio.get_running_loop().create_task(self.reload())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        if self.stop.is_set():
            return
        self.signalled = time.monotonic()
        self.signal_name = signum.name
        self.models.begin_stopping()
        self.stop.set()
        log.info("%s: not ready; %d requests unanswered", signum.name, self.models.unanswered)

    def refuse(self) -> None:
        """From now on new predictions get 503."""
        self.models.begin_drain()
        # The monotonic clock is system-wide on Linux: a load generator can compare its own
        # send times with it to tell requests sent before the drain from those after.
        now = time.monotonic()
        log.info("%s: draining %d unanswered requests (monotonic %.6f)", self.signal_name, self.models.unanswered, now)


async def serve(settings: Settings, *, worker: int = 0, restarted: bool = False, model: Model | None = None) -> None:
    """Serve until a signal, then shut down in the order the module docstring gives. `model`
    replaces the bundle's ONNX session (the benchmark's instant model; no setting reaches it)."""
    server = settings.server
    app = create_app(settings, metrics=Metrics(worker=worker), model=model)
    if restarted:
        app[METRICS].worker_restarts.inc()
    count_drops(app[METRICS].prediction_log_dropped.inc)
    shutdown = Shutdown(app[MODELS], app[METRICS])
    # Handlers first: a signal during start-up then stops loading between steps and warm-up
    # runs, and the process exits 0 instead of being killed halfway.
    shutdown.install()
    runner = Runner(
        app,
        handle_signals=False,
        access_log=log if server.access_log else None,
        shutdown_timeout=RESPONSE_GRACE_S,
        **server_options(settings),
    )
    try:
        await runner.setup()  # loads, checks and warms the model; raises StartupError
    except StartupCancelled:
        log.info("stopped during start-up")
        return
    tune_gc()
    raise_open_file_limit()
    listener = open_listener(server.host, server.port, backlog=server.backlog, reuse_port=server.workers > 1)
    await web.SockSite(runner, listener, backlog=server.backlog).start()
    descriptors = asyncio.get_running_loop().create_task(watch_open_files(listener))
    metrics_runner = None
    if server.expose_metrics and server.metrics_port:
        metrics_runner = web.AppRunner(create_metrics_app(app), handle_signals=False, access_log=None)
        await metrics_runner.setup()
        metrics_listener = open_listener(server.host, server.metrics_port, backlog=128, reuse_port=server.workers > 1)
        await web.SockSite(metrics_runner, metrics_listener).start()
        log.info("metrics on http://%s:%d/metrics", server.host, server.metrics_port)
    log.info("serving on http://%s:%d (POST /predict, docs at /docs)", server.host, server.port)
    await shutdown.stop.wait()
    if server.drain_delay_s and not shutdown.models.draining:
        log.info("admitting predictions for %.1f s more (server.drain_delay_s)", server.drain_delay_s)
        await asyncio.sleep(server.drain_delay_s)
    shutdown.refuse()
    await drain(app)  # the listener stays open meanwhile: newcomers get a 503, not a refused connection
    left = await empty_backlog(listener)
    descriptors.cancel()
    if left:
        log.warning("closing the listener with %d connections still queued", left)
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info("stopped %.2f s after the signal", time.monotonic() - shutdown.signalled)


def raise_open_file_limit() -> None:
    """Every connection holds a file descriptor; a soft limit of 1,024 (a common default)
    would refuse connections long before the server is busy. Raise it to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open-file limit stays at %d (could not raise it to %d: %s)", soft, target, exc)
        else:
            log.info("open-file limit raised from %d to %d", soft, target)


def tune_gc() -> None:
    """Freeze what start-up allocated (modules, model, tokenizer) out of the collector's reach,
    and let young collections run rarely: per-request objects die by reference counting."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)
