"""Entry point: `python app.py [--config config.toml] [--host H] [--port P] [--set section.key=value ...]`.

Serves until SIGTERM/SIGINT, then drains (batcher/server.py says in what order) and exits
0 within server.drain_delay_s + server.shutdown_timeout_s. With server.workers > 1 this
process supervises that many workers on the same port (batcher/supervisor.py).
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import sys
from pathlib import Path

import uvloop

from batcher.application import install_log_filters
from batcher.config import Settings, load_settings
from batcher.errors import StartupError
from batcher.server import serve
from batcher.supervisor import supervise

log = logging.getLogger("batcher")
DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.toml"


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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except StartupError as exc:
        print(f"batcher: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings, worker=None)
    if settings.server.workers > 1:
        return supervise(settings, run_worker)
    return run_worker(settings, 0, False)


def run_worker(settings: Settings, worker: int, restarted: bool) -> int:
    """Serve in this process until a signal; 2 when it cannot start."""
    if settings.server.workers > 1:
        configure_logging(settings, worker=worker)
    try:
        uvloop.run(serve(settings, worker=worker, restarted=restarted))
    except StartupError as exc:
        print(f"batcher: cannot start: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"batcher: cannot listen on {settings.server.host}:{settings.server.port}: {exc}", file=sys.stderr)
        return 2
    return 0


def configure_logging(settings: Settings, *, worker: int | None) -> None:
    where = "" if worker is None else f"[worker {worker}] "
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s",
        force=True,
    )
    install_log_filters()
    predictions = logging.getLogger("batcher.predictions")
    predictions.setLevel(logging.INFO)  # sampled by log.predictions, whatever server.log_level says
    if settings.log.predictions_file:
        # JSON lines only, reopened when logrotate moves the file; not in the server's log.
        handler = logging.handlers.WatchedFileHandler(settings.resolve(settings.log.predictions_file), encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        predictions.handlers[:] = [handler]
        predictions.propagate = False


if __name__ == "__main__":
    sys.exit(main())
