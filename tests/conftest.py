"""Shared fixtures: a tiny real ONNX bundle, settings pointing at it, and a loopback client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import Application

from batcher.application import create_app, server_options
from batcher.batching import Batcher
from batcher.config import BatchingSettings, ModelSettings, Settings, load_settings
from batcher.fastpath import Runner
from batcher.metrics import Metrics
from batcher.model.bundle import load_bundle
from batcher.model.session import OnnxModel
from batcher.model.tokenization import Encoded, Text
from batcher.worker import Encode, Model, Worker
from tests.tiny_model import LABELS, build_bundle

MakeSettings = Callable[..., Settings]
MODEL = "intent-zh"
"""The default model's name (model.name), which every model-specific series carries."""
MakeBatcher = Callable[..., tuple[Batcher, "FakeModel", Metrics]]
MakeClient = Callable[..., Awaitable[TestClient[Any, Application]]]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle") / MODEL)


@pytest.fixture
def make_settings(tiny_bundle: Path) -> MakeSettings:
    def make(*overrides: str) -> Settings:
        base = [f'model.path="{tiny_bundle}"', "model.warmup_runs=1", "model.intra_op_threads=1"]
        return load_settings(None, env={}, overrides=[*base, *overrides])

    return make


@pytest.fixture
def make_client(aiohttp_server: Any, aiohttp_client: Any, make_settings: MakeSettings) -> MakeClient:
    async def make(*overrides: str, model: Model | None = None, metrics: Metrics | None = None) -> Any:
        settings = make_settings(*overrides)
        app = create_app(settings, model=model, metrics=metrics or Metrics(process=False))
        # The connection options app.py gives its runner (TestServer sets handler_cancellation itself).
        options = {key: value for key, value in server_options(settings).items() if key != "handler_cancellation"}
        server = LaneTestServer(app)
        await server.start_server(**options)
        return await aiohttp_client(server)

    return make


class LaneTestServer(TestServer):
    """aiohttp's TestServer with the runner app.py uses: plain POST /predict requests take
    the fast lane (batcher.fastpath), everything else aiohttp."""

    async def _make_runner(self, **kwargs: Any) -> Runner:
        return Runner(self.app, **kwargs)


class FakeModel:
    """A stand-in model for tests about timing and ordering only: it can hold runs on a gate,
    take time, or fail, and records the batches it ran. Returns fixed logits (intent 1).
    Until `armed`, runs (the warm-up's) pass straight through and are not recorded."""

    provider = "fake"

    def __init__(self, num_labels: int = len(LABELS), *, delay_s: float = 0.0) -> None:
        self.num_labels = num_labels
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = 0
        self.batches: list[int] = []
        self.armed = False
        self._started = threading.Semaphore(0)
        self._lock = threading.Lock()

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        if self.armed:
            self._started.release()
            self.gate.wait(timeout=10)
            with self._lock:
                self.batches.append(len(input_ids))
                if self.fail_next:
                    self.fail_next -= 1
                    raise RuntimeError("injected model failure")
        if self.delay_s:
            time.sleep(self.delay_s)
        logits = np.zeros((len(input_ids), self.num_labels), dtype=np.float32)
        logits[:, 1] = 2.0
        return logits

    async def started(self, runs: int = 1) -> None:
        """Wait until `runs` more armed runs have started (and are perhaps held on the gate)."""
        for _ in range(runs):
            assert await asyncio.to_thread(self._started.acquire, timeout=5), "no model run started"

    @property
    def rows(self) -> int:
        return sum(self.batches)


class FaultInjector:
    """The real model behind the Model protocol, with test-only faults: while `hold` is clear a
    run blocks (a hang), while `stepping` each run waits for a step, and the next `fail_next`
    runs raise. Records (rows, failed) per run."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.provider = model.provider
        self.hold = threading.Event()
        self.hold.set()
        self.running = threading.Event()
        """Set once a run has started (and is perhaps held)."""
        self.stepping = False
        self.steps = threading.Semaphore(0)
        """While stepping, each run waits for one release() of this."""
        self.fail_next = 0
        self.runs: list[tuple[int, bool]] = []
        self._lock = threading.Lock()

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        self.running.set()
        self.hold.wait(timeout=10)
        if self.stepping:
            self.steps.acquire(timeout=10)
        with self._lock:
            failed = self.fail_next > 0
            self.fail_next -= failed
            self.runs.append((len(input_ids), failed))
        if failed:
            raise RuntimeError("injected model fault")
        return self.model.run(input_ids, attention_mask, token_type_ids)


@pytest.fixture
def real_model(tiny_bundle: Path) -> FaultInjector:
    """The tiny bundle's real ONNX session, behind the fault injector (no fault armed)."""
    return FaultInjector(OnnxModel(load_bundle(tiny_bundle, "model.onnx"), ModelSettings(intra_op_threads=1)))


@pytest.fixture
def fake_model() -> FakeModel:
    """Warm-up runs pass straight through; the test arms the model when traffic starts."""
    return FakeModel()


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait, yielding to the loop, until `condition()` holds: for state that the server's
    own coroutines change on this same loop (a request reaching the queue, say)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


def metric(metrics: Metrics, name: str, *, model: str = MODEL, **labels: str) -> float:
    """One sample of a model's series (0 when absent)."""
    value = metrics.registry.get_sample_value(name, {"model": model, **labels})
    return 0.0 if value is None else value


def row(length: int) -> Text:
    """A request whose text is `length` tokens long under `encode_chars`."""
    return Text("字" * length, length)


def encode_chars(rows: Sequence[Text]) -> list[Encoded]:
    """A stand-in tokenizer for tests with a fake model: one token per character."""
    return [Encoded(list(range(1, len(row.text) + 1)), [0] * len(row.text)) for row in rows]


@pytest.fixture
async def make_batcher() -> AsyncIterator[MakeBatcher]:
    """A started batcher over an armed FakeModel; `held=True` holds every run on the gate
    until the test opens it. Closed (gate opened) at the end of the test."""
    made: list[tuple[Batcher, FakeModel]] = []

    def make(
        *,
        model: FakeModel | None = None,
        held: bool = False,
        delay_s: float = 0.0,
        encode: Encode | None = None,
        lone: FakeModel | None = None,
        **settings: Any,
    ) -> tuple[Batcher, FakeModel, Metrics]:
        model = model or FakeModel(num_labels=4, delay_s=delay_s)
        model.armed = True
        if held:
            model.gate.clear()
        config = BatchingSettings(**settings)
        metrics = Metrics(process=False)
        worker = Worker(
            model,
            encode=encode or encode_chars,
            instances=config.instances,
            pad_id=0,
            num_labels=4,
            sched_idle=config.worker_sched_idle,
            nice=config.worker_nice,
            lone=lone,
        )
        batcher = Batcher(worker, settings=config, metrics=metrics.for_model(MODEL))
        batcher.start()
        made.append((batcher, model))
        return batcher, model, metrics

    yield make
    for batcher, model in made:
        model.gate.set()
        await batcher.close(1)
