"""Shared fixtures: a tiny real ONNX bundle, settings pointing at it, and a loopback client."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient
from aiohttp.web import Application

from batcher.application import create_app, server_options
from batcher.config import ModelSettings, Settings, load_settings
from batcher.metrics import Metrics
from batcher.model import Model, OnnxModel, load_bundle
from tests.tiny_model import LABELS, build_bundle

MakeSettings = Callable[..., Settings]
MakeClient = Callable[..., Awaitable[TestClient[Any, Application]]]


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("bundle"))


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
        return await aiohttp_client(await aiohttp_server(app, **options))

    return make


class FakeModel:
    """A stand-in model for tests about timing and ordering only: it can block on a gate,
    sleep, or fail, and records the batches it ran. Returns fixed logits."""

    provider = "fake"

    def __init__(self, num_labels: int = len(LABELS), *, delay_s: float = 0.0) -> None:
        self.num_labels = num_labels
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.fail_next = 0
        self.batches: list[int] = []
        self.armed = False
        self._lock = threading.Lock()

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        if self.armed:
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
