"""Servers on loopback for the benchmark, reliability and fuzz runs (and the end-to-end
tests): start a process, wait until it listens, stop it with SIGTERM; plus the provenance
(date, machine, commit) that heads every figures file."""

from __future__ import annotations

import datetime
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "intent-zh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process on loopback, started and stopped around a set of steps. What it
    writes to stderr (its log) goes to a file, never a pipe that could fill and block it,
    and is in `log` once it has stopped."""

    def __init__(self, name: str, args: list[str], *, cwd: Path = ROOT) -> None:
        self.name = name
        self.cwd = cwd
        self.port = free_port()
        self.args = [a.replace("{port}", str(self.port)) for a in args]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = ""
        self._log_file: IO[bytes] | None = None

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHER_")}
        self._log_file = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            self.args, cwd=self.cwd, env=env, stdout=subprocess.DEVNULL, stderr=self._log_file
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"bench: {self.name} exited: {self._read_log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"bench: {self.name} did not start")

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log = self._read_log()

    def _read_log(self) -> str:
        assert self._log_file is not None
        self._log_file.seek(0)
        return self._log_file.read().decode(errors="replace")


def batcher_server(name: str, *overrides: str, tree: Path = ROOT) -> Server:
    """batcher from the checkout at `tree` (this one by default), with `--set` overrides."""
    args = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", "{port}", "--set", 'server.log_level="warning"']
    for item in overrides:
        args += ["--set", item]
    return Server(name, args, cwd=tree)


def naive_server(name: str, padding: str, graph: str = "model.onnx") -> Server:
    """The old one-run-per-request design (bench/baselines/naive_server.py) on `graph`."""
    args = [sys.executable, "-m", "bench.baselines.naive_server", "--model", str(MODEL), "--port", "{port}"]
    return Server(name, [*args, "--padding", padding, "--graph", graph])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB RAM, no GPU, Python {platform.python_version()}"


def commit() -> str:
    """The checked-out commit, short form (empty outside a git checkout)."""
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip()


def provenance() -> dict[str, str]:
    """When, where and at which commit a run measured: the head of every figures file."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": commit(),
    }


def rss_bytes(pid: int) -> int:
    """A process's resident set size, from /proc (0 if it says none)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
