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
import urllib.request
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

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
        ready_path: str | None = None,
    ) -> None:
        self.name = name
        self.ready_path = ready_path
        self.cwd = cwd
        self.extra_env = env or {}
        self.port = free_port()
        self.args = [a.replace("{port}", str(self.port)) for a in args]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = ""
        self._log_file: IO[bytes] | None = None

    def __enter__(self) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHER_")} | self.extra_env
        self._log_file = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            self.args, cwd=self.cwd, env=env, stdout=subprocess.DEVNULL, stderr=self._log_file
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"bench: {self.name} exited: {self._read_log()}")
            if self._ready():
                return self
            time.sleep(0.1)
        raise SystemExit(f"bench: {self.name} did not start")

    def _ready(self) -> bool:
        """Listening, and (with `ready_path`) answering 200 there: some servers (Triton) open
        their port before the model has loaded."""
        try:
            if self.ready_path is None:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

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


PEERS_VENV = ROOT / ".venv-peers"
PEER_SETTINGS = {"WORKERS": "2", "INSTANCES": "2", "THREADS": "1", "BATCH": "32", "WAIT_MS": "2"}


def peer_server(name: str, peer: str, graph: str, *, instant: bool = False) -> Server | None:
    """mosec, PyTriton or Infinity (bench/peers/) from its own virtual environment, configured
    as batcher's defaults are where the framework lets it: 2 workers of 1 ONNX Runtime thread,
    batches of up to 32, a 2 ms wait (Infinity: batches of up to 32, its own engine's threads,
    no wait setting). None when `make bench-peers-setup` has not made that environment."""
    python = PEERS_VENV / peer / "bin" / "python"
    if not python.exists():
        return None
    env = PEER_SETTINGS | {"BUNDLE": str(MODEL), "GRAPH": graph, "INSTANT": "1" if instant else "0"}
    args = [str(python), "-m", f"bench.peers.{peer}_server", "--port", "{port}"]
    if peer == "infinity":
        return Server(name, args, env=env, ready_path="/health")
    if peer == "mosec":
        args += ["--address", "127.0.0.1", "--log-level", "warning"]
    else:
        # Triton's Python-backend stub links libpython by soname: point it at the library of
        # the interpreter the environment was made from, or its stdlib and C core disagree.
        found = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
            capture_output=True,
            text=True,
            check=True,
        )
        env["LD_LIBRARY_PATH"] = found.stdout.strip()
    ready = "/v2/models/intent-zh/ready" if peer == "pytriton" else None
    return Server(name, args, env=env, ready_path=ready)


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
