"""Where a running batcher's time goes: py-spy samples, grouped.

`start` attaches py-spy to the server process (non-blocking, so the server is never paused)
for one load step; `summarize` reads py-spy's raw output: how busy the event loop and the
model threads were (share of a core), and which part of the request path the loop's
samples fell in. Each sample counts for the frame nearest its leaf that names a part.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE_HZ = 100
# (part, substrings of a frame "function (file:line)"), for the event loop's samples.
LOOP_PARTS = (
    ("tokenization", ("batcher/model/tokenization.py", "batcher/model/formats.py")),
    ("validation (pydantic)", ("pydantic/", "batcher/schemas.py")),
    ("metrics (prometheus_client)", ("prometheus_client/", "batcher/metrics.py")),
    ("batch selection (take_batch)", ("batcher/queue.py",)),
    ("batcher coroutine and futures", ("batcher/batching.py", "batcher/policy.py", "batcher/worker.py")),
    (
        "handlers, middleware, fast lane, rendering",
        (
            "batcher/handlers.py",
            "batcher/middleware.py",
            "batcher/fastpath.py",
            "batcher/runtime.py",
            "batcher/model/dialogue.py",
            "batcher/model/heads.py",
        ),
    ),
    ("aiohttp: parsing, request and response objects, writes", ("aiohttp/",)),
    ("uvloop and asyncio: socket I/O, polling, callbacks (C)", ("asyncio/", "uvloop/")),
)
# For the model threads' samples.
WORKER_PARTS = (
    ("ONNX Runtime run", ("OnnxModel.run",)),
    ("padding (numpy)", ("pad_batch",)),
    ("softmax (numpy)", ("softmax",)),
)
WORKER_MARK = "Worker.compute"


def py_spy() -> str | None:
    """The py-spy executable: beside this Python's (a virtual environment), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    executable = py_spy()
    if executable is None:
        raise FileNotFoundError("py-spy is not installed (pip install -r loadtest/requirements.txt)")
    command = [executable, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    command += ["--rate", str(RATE_HZ), "--nonblocking", "--format", "raw", "--output", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def part_of(frames: list[str], parts: tuple[tuple[str, tuple[str, ...]], ...], default: str) -> str:
    for frame in reversed(frames):
        for name, marks in parts:
            if any(mark in frame for mark in marks):
                return name
    return default


def summarize(raw: str, seconds: float, rate_hz: int = RATE_HZ) -> dict[str, Any]:
    """Busy shares (1.0 = one core) of the loop and the model threads, and the shares of the
    loop's and the model threads' samples by part."""
    loop: Counter[str] = Counter()
    workers: Counter[str] = Counter()
    other = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[0].startswith("Thread._bootstrap"):
            if any(WORKER_MARK in frame for frame in frames):
                workers[part_of(frames, WORKER_PARTS, "other Python in the model threads")] += int(count)
            else:
                other += int(count)
        else:
            loop[part_of(frames, LOOP_PARTS, "other")] += int(count)
    possible = seconds * rate_hz
    loop_total = sum(loop.values())
    worker_total = sum(workers.values())
    return {
        "seconds": seconds,
        "rate_hz": rate_hz,
        "loop_busy": round(loop_total / possible, 3),
        "model_threads_busy": round(worker_total / possible, 3),
        "other_threads_busy": round(other / possible, 3),
        "loop_parts": [{"part": name, "share": round(count / loop_total, 3)} for name, count in loop.most_common()],
        "model_parts": [
            {"part": name, "share": round(count / worker_total, 3)} for name, count in workers.most_common()
        ],
    }
