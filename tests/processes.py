"""app.py as a real process on loopback: start it, wait until it listens, collect its exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent


def start(
    bundle: Path, *overrides: str, config: Path | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """app.py serving `bundle` on a free port, with `--set` overrides and `env` added to the
    environment (less BATCHER_ variables); the process and its URL."""
    port = free_port()
    args = [
        sys.executable,
        str(ROOT / "app.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--set",
        f'model.path="{bundle}"',
        "--set",
        "model.warmup_runs=1",
    ]
    if config is not None:
        args += ["--config", str(config)]
    for item in overrides:
        args += ["--set", item]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("BATCHER_")} | (env or {})
    process = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen[str], url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {finish(process, 5)[1]}")
        try:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server did not start listening")


def finish(process: subprocess.Popen[str], timeout_s: float) -> tuple[int, str]:
    """Wait for exit; the exit code and everything the process printed."""
    output, _ = process.communicate(timeout=timeout_s)
    return process.returncode, output
