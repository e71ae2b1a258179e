"""The `batcher` command (also `python -m batcher`, and `python app.py` for `serve`).

`serve` reads the settings (file, then BATCHER_* variables, then --set and the other flags)
and serves until SIGTERM/SIGINT, then drains (batcher/server.py says in what order) and
exits 0 within server.drain_delay_s + server.shutdown_timeout_s; with server.workers > 1
it supervises that many workers on the same port (batcher/supervisor.py). `check` loads a
bundle the same way and runs one prediction (batcher/check.py). `loadtest` is the load
generator's own command line (loadtest/__main__.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import uvloop

from batcher import __version__
from batcher.application import install_log_filters
from batcher.check import run_check
from batcher.config import Settings, load_settings
from batcher.errors import StartupError
from batcher.prediction_log import PredictionLogHandler
from batcher.server import serve
from batcher.supervisor import supervise

PACKAGE = Path(__file__).resolve().parent
COMMANDS = ("serve", "check", "loadtest")
# `model.path` and `models.NAME.path`: given on the command line, relative to the current directory.
PATH_KEY = re.compile(r"(model|models\.[A-Za-z0-9_-]+)\.path")
DESCRIPTION = "batcher: serve an ONNX text classifier over HTTP with dynamic batching."
ENV_NOTE = "Every config key can also be set as BATCHER_<SECTION>__<KEY>, e.g.\nBATCHER_BATCHING__MAX_WAIT_S=0.001."
TOP_EXAMPLES = """examples:
  batcher serve                      # the bundled intent-zh model on port 8000
  batcher serve ./my-model --port 9000
  batcher check ./my-model           # load it as serve would, run one prediction
  batcher loadtest run --concurrency 64 --duration 20
"""
SERVE_EXAMPLES = f"""examples:
  batcher serve                                   # the bundled intent-zh model on 0.0.0.0:8000
  batcher serve ./my-model --port 9000            # a bundle directory (relative to here)
  batcher serve --config my.toml --set batching.max_batch_size=16 --workers 2

MODEL_DIR holds model.onnx (or model.int8.onnx), tokenizer.json or vocab.txt, and labels.json
or config.json. Without --config the packaged config.toml is read (the bundled model).
{ENV_NOTE}
"""
CHECK_EXAMPLES = """examples:
  batcher check ./my-model           # prints graph, provider, labels, version and one answer
  batcher check                      # the bundled model
  batcher check ./my-model --text "play some music" --set model.max_seq_len=64

Exit status 0 when the bundle loads, warms up and answers; 2 and a one-line message when not.
"""


def default_config() -> Path:
    """The settings read without --config: the copy the wheel carries, else the checkout's."""
    packaged = PACKAGE / "config.toml"
    return packaged if packaged.is_file() else PACKAGE.parent / "config.toml"


def build_parser(prog: str = "batcher") -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=TOP_EXAMPLES, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"batcher {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve",
        help="serve a model bundle over HTTP (default: the bundled intent-zh)",
        description="Serve a model bundle over HTTP until SIGTERM/SIGINT, then drain and exit 0.",
        epilog=SERVE_EXAMPLES,
        formatter_class=raw,
    )
    add_settings_arguments(serve_parser)
    serve_parser.add_argument("--host", help="address to listen on (overrides server.host)")
    serve_parser.add_argument("--port", type=int, help="port to listen on (overrides server.port)")
    serve_parser.add_argument(
        "--workers", type=int, metavar="N", help="processes serving the port (overrides server.workers)"
    )
    check_parser = commands.add_parser(
        "check",
        help="load a model bundle as serve would, run one prediction, say what was loaded",
        description="Load a model bundle as `batcher serve` would, print what was loaded, run one prediction.",
        epilog=CHECK_EXAMPLES,
        formatter_class=raw,
    )
    add_settings_arguments(check_parser)
    check_parser.add_argument(
        "--text", help="what the sample request says (default: the bundle's batcher.json sample, else hello)"
    )
    commands.add_parser(
        "loadtest",
        help="load a running server over HTTP (batcher loadtest --help; needs batcher[loadtest])",
        add_help=False,
    )
    return parser


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL_DIR, --config and --set: what `serve` and `check` both read."""
    parser.add_argument(
        "model_dir", nargs="?", type=Path, metavar="MODEL_DIR", help="model bundle directory (overrides model.path)"
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (default: the packaged config.toml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set batching.max_batch_size=1 (repeatable)",
    )


def settings_from(args: argparse.Namespace) -> Settings:
    """The settings `args` ask for: the file, the environment, then the command line."""
    overrides: list[str] = []
    if args.model_dir is not None:
        overrides.append(f"model.path={toml_string(os.path.abspath(args.model_dir))}")
    overrides += [from_cwd(item) for item in args.overrides]
    if getattr(args, "host", None) is not None:
        overrides.append(f"server.host={toml_string(args.host)}")
    if getattr(args, "port", None) is not None:
        overrides.append(f"server.port={args.port}")
    if getattr(args, "workers", None) is not None:
        overrides.append(f"server.workers={args.workers}")
    return load_settings(args.config or default_config(), overrides=overrides)


def from_cwd(item: str) -> str:
    """A `--set model.path=...` (or `models.NAME.path=...`) with a relative path, made absolute
    against the current directory; a path in a config file stays relative to that file."""
    key, sep, value = item.partition("=")
    if not sep or not PATH_KEY.fullmatch(key.strip()):
        return item
    try:
        path = tomllib.loads(f"value = {value.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        path = value.strip()  # a bare string, as load_settings reads it
    if not isinstance(path, str) or not path or Path(path).is_absolute():
        return item
    return f"{key.strip()}={toml_string(os.path.abspath(path))}"


def toml_string(text: str) -> str:
    """`text` as a TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)


def main(argv: Sequence[str] | None = None, *, prog: str = "batcher") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadtest"]:  # its own parser, options and help
        return run_loadtest(argv[1:], prog=f"{prog} loadtest")
    args = build_parser(prog).parse_args(argv)
    try:
        settings = settings_from(args)
    except StartupError as exc:
        print(f"batcher: {exc}", file=sys.stderr)
        return 2
    if args.command == "check":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return run_check(settings, sys.stdout, text=args.text)
    try:
        configure_logging(settings, worker=None)
    except OSError as exc:  # the prediction log's file
        print(f"batcher: cannot open log.predictions_file: {exc}", file=sys.stderr)
        return 2
    if settings.server.workers > 1:
        return supervise(settings, run_worker)
    return run_worker(settings, 0, False)


def run_loadtest(argv: list[str], *, prog: str) -> int:
    try:
        from loadtest.__main__ import main as loadtest_main
    except ModuleNotFoundError as exc:
        print(f"batcher loadtest: {exc.name} is not installed: pip install 'batcher[loadtest]'", file=sys.stderr)
        return 2
    return loadtest_main(argv, prog=prog)


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
        # JSON lines only, reopened when logrotate moves the file; not in the server's log. A
        # line it cannot write is dropped and counted, with one warning (batcher/prediction_log.py).
        handler = PredictionLogHandler(settings.resolve(settings.log.predictions_file))
        handler.setFormatter(logging.Formatter("%(message)s"))
        predictions.handlers[:] = [handler]
        predictions.propagate = False


def entry_point() -> None:
    """The `batcher` console script."""
    sys.exit(main())
