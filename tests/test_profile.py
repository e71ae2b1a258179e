"""bench.profile: grouping py-spy's raw samples by thread and by part of the request path."""

from __future__ import annotations

import pytest

from bench.profile import summarize

MAIN = "<module> (app.py:118);run (uvloop/__init__.py:92);Runner.run (asyncio/runners.py:118)"
WORKER = (
    "Thread._bootstrap (threading.py:1002);Worker._serve (batcher/worker.py:140);Worker.compute (batcher/worker.py:160)"
)
RAW = "\n".join(
    [
        f"{MAIN} 40",  # in uvloop's C code
        f"{MAIN};predict (batcher/handlers.py:72);encode (batcher/handlers.py:95);"
        "TextEncoder.encode (batcher/model/tokenization.py:64) 20",
        f"{MAIN};predict (batcher/handlers.py:72);validate (batcher/schemas.py:129);"
        "BaseModel.model_validate (pydantic/main.py:792) 10",
        "RequestHandler.start (aiohttp/web_protocol.py:686);StreamWriter.__init__ (aiohttp/http_writer.py:79) 30",
        f"{WORKER};OnnxModel.run (batcher/model/session.py:120) 180",
        f"{WORKER};pad_batch (batcher/worker.py:60) 20",
        "Thread._bootstrap (threading.py:1002);Worker._serve (batcher/worker.py:140) 5",
        "garbage without a count",
    ]
)


def test_samples_are_grouped_by_thread_and_by_the_part_nearest_the_leaf() -> None:
    summary = summarize(RAW, seconds=2, rate_hz=100)  # 200 samples = one core busy throughout
    assert summary["loop_busy"] == pytest.approx(0.5)
    assert summary["model_threads_busy"] == pytest.approx(1.0)
    assert summary["other_threads_busy"] == pytest.approx(0.025)
    loop = {part["part"]: part["share"] for part in summary["loop_parts"]}
    assert loop == {
        "uvloop and asyncio: socket I/O, polling, callbacks (C)": 0.4,
        "aiohttp: parsing, request and response objects, writes": 0.3,
        "tokenization": 0.2,
        "validation (pydantic)": 0.1,
    }
    model = {part["part"]: part["share"] for part in summary["model_parts"]}
    assert model == {"ONNX Runtime run": 0.9, "padding (numpy)": 0.1}
