"""Entry point: `python app.py [--config config.toml] [--host H] [--port P] [--set section.key=value ...]`.

Serves until SIGTERM/SIGINT; then readiness drops, new predictions get 503, everything
already admitted is answered, and the process exits 0 within server.shutdown_timeout_s.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import resource
import signal
import sys
import time
from pathlib import Path

import uvloop
from aiohttp import web

from batcher.application import create_app, create_metrics_app, drain, install_log_filters, server_options
from batcher.config import Settings, load_settings
from batcher.errors import StartupCancelled, StartupError
from batcher.handlers import MODELS

log = logging.getLogger("batcher")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.toml"
# The cyclic GC's first-generation threshold (CPython's default: 700). Under a 3x overload the
# default ran ~14 young collections a second, each stopping the loop for up to 10-50 ms
# while it walked the objects of every request in flight; at 10,000 the collector ran about
# once every 2 s and the p99 of the 429s fell from ~50 ms to ~9 ms (2 cores, RELIABILITY.md).
GC_GEN0_THRESHOLD = 10_000
OPEN_FILES_CAP = 1 << 20  # Linux's default fs.nr_open: the most a process may ask for
# After the drain every admitted request has its answer; aiohttp gets this long to write
# them out before it closes the connections (its own 0 would mean "wait for ever").
RESPONSE_GRACE_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="batcher: serve an ONNX text classifier over HTTP with dynamic batching.",
        epilog="Every config key can also be set as BATCHER_<SECTION>__<KEY>, e.g. BATCHER_BATCHING__MAX_WAIT_MS=2.",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML settings file (default: %(default)s)")
    parser.add_argument("--host", help="address to listen on (overrides server.host)")
    parser.add_argument("--port", type=int, help="port to listen on (overrides server.port)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set batching.max_batch_size=1 (repeatable)",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f'server.host="{args.host}"')
    if args.port is not None:
        overrides.append(f"server.port={args.port}")
    return load_settings(args.config, overrides=overrides)


async def serve(settings: Settings) -> None:
    app = create_app(settings)
    models = app[MODELS]
    stop = asyncio.Event()
    drain_started = 0.0

    def on_signal(signum: signal.Signals) -> None:
        """Drain at once, in the signal's own callback, so no request read after it is admitted."""
        nonlocal drain_started
        if signum == signal.SIGHUP:
            log.warning("SIGHUP: this version has nothing to reload; ignored (SIGTERM or SIGINT stop the server)")
            return
        if stop.is_set():
            return
        drain_started = time.monotonic()
        models.begin_drain()
        stop.set()
        # The monotonic clock is system-wide on Linux: a load generator can compare its own
        # send times with it to tell requests sent before the drain from those after.
        log.info("%s: draining %d unanswered requests (monotonic %.6f)", signum.name, models.unanswered, drain_started)

    # Handlers first: a signal during start-up then stops loading between steps and warm-up
    # runs, and the process exits 0 instead of being killed halfway.
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=log if settings.server.access_log else None,
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
    site = web.TCPSite(runner, settings.server.host, settings.server.port, backlog=settings.server.backlog)
    await site.start()
    metrics_runner = None
    if settings.server.expose_metrics and settings.server.metrics_port:
        metrics_runner = web.AppRunner(create_metrics_app(app), handle_signals=False, access_log=None)
        await metrics_runner.setup()
        await web.TCPSite(metrics_runner, settings.server.host, settings.server.metrics_port).start()
        log.info("metrics on http://%s:%d/metrics", settings.server.host, settings.server.metrics_port)
    log.info("serving on http://%s:%d (POST /predict, docs at /docs)", settings.server.host, settings.server.port)
    await stop.wait()
    await drain(app)  # the listener stays open meanwhile: newcomers get a 503, not a refused connection
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info("stopped after %.2f s of draining", time.monotonic() - drain_started)


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except StartupError as exc:
        print(f"batcher: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    install_log_filters()
    try:
        uvloop.run(serve(settings))
    except StartupError as exc:
        print(f"batcher: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"batcher: cannot listen on {settings.server.host}:{settings.server.port}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
