"""What the HTTP layer serves: a `Runtime` per loaded, warm model, held by `Models`.

`load_runtime` builds a Runtime whole (bundle, tokenizer, session, warm-up, batcher) and it
never changes afterwards: handlers only read it. `Models` holds the runtimes by name and
the server's draining state, and drains them all in one place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from batcher.batching import Batcher
from batcher.bundle import ModelBundle, choose_graph, load_bundle
from batcher.config import Settings
from batcher.errors import Draining, NotReady, StartupCancelled
from batcher.metrics import Metrics
from batcher.model import CUDA, OnnxModel, usable_provider
from batcher.tokenization import TextEncoder
from batcher.worker import Model, Worker

log = logging.getLogger(__name__)
WARMUP_BATCH_SIZES = (1, 4)
WARMUP_LENGTHS = (8, 32)
T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """One model, loaded and warm, with the tokenizer and batcher that serve it."""

    name: str
    bundle: ModelBundle
    encoder: TextEncoder
    batcher: Batcher
    provider: str

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels

    @property
    def version(self) -> str:
        """The graph file's content hash, shortened."""
        return self.bundle.sha256[:12]

    @property
    def ready(self) -> bool:
        """Admitting, its loop alive, its last run good, and no run hung past the deadline."""
        batcher = self.batcher
        return batcher.accepting and batcher.alive and not batcher.last_run_failed and not batcher.stalled


async def load_runtime(
    settings: Settings, metrics: Metrics, *, model: Model | None = None, cancelled: Callable[[], bool] = bool
) -> Runtime:
    """Load, check and warm the configured model, then start its batcher. `model` replaces
    the bundle's ONNX session (tests about timing use a fake). Between steps, and between
    warm-up runs, `cancelled()` is asked whether a signal wants the server gone: then
    StartupCancelled."""
    loop = asyncio.get_running_loop()

    async def step(function: Callable[..., T], *args: Any) -> T:
        if cancelled():
            raise StartupCancelled()
        return await loop.run_in_executor(None, function, *args)

    directory, file = settings.model_dir, settings.model.file
    provider = None
    if model is None:  # the device decides the graph when model.file = "auto"
        probe = directory / choose_graph(directory, file, on_gpu=False)  # any graph tells whether CUDA runs
        provider = await step(usable_provider, settings.model, probe)
    file = choose_graph(directory, file, on_gpu=provider == CUDA)
    bundle = await step(load_bundle, directory, file)
    encoder = await step(TextEncoder.from_bundle, bundle.directory, settings.model.max_seq_len)
    if model is None:
        model = await step(OnnxModel, bundle, settings.model, provider)
    name = settings.model.name or bundle.name
    log.info("model %s (sha256 %s) runs on %s", name, bundle.sha256[:12], model.provider)
    warm = partial(
        warm_up,
        model,
        pad_id=encoder.pad_id,
        batch_sizes=sorted({*WARMUP_BATCH_SIZES, settings.batching.max_batch_size}),
        lengths=sorted({*WARMUP_LENGTHS, settings.model.max_seq_len}),
        runs=settings.model.warmup_runs,
        cancelled=cancelled,
    )
    await step(warm)
    batching = settings.batching
    worker = Worker(
        model,
        instances=batching.instances,
        pad_id=encoder.pad_id,
        num_labels=len(bundle.labels),
        sched_idle=batching.worker_sched_idle,
        nice=batching.worker_nice,
    )
    batcher = Batcher(worker, settings=batching, metrics=metrics)
    metrics.describe_model(
        {
            "name": name,
            "sha256": bundle.sha256[:12],
            "provider": model.provider,
            "labels": str(len(bundle.labels)),
            **settings.describe(),
        }
    )
    batcher.start()
    return Runtime(name, bundle, encoder, batcher, model.provider)


def warm_up(
    model: Model,
    *,
    pad_id: int,
    batch_sizes: list[int],
    lengths: list[int],
    runs: int,
    cancelled: Callable[[], bool] = bool,
) -> None:
    """Run every batch size x length so kernels and memory arenas are ready before traffic."""
    for _ in range(runs):
        for rows in batch_sizes:
            for length in lengths:
                if cancelled():
                    raise StartupCancelled()
                ids = np.full((rows, length), pad_id + 1, dtype=np.int64)
                model.run(ids, np.ones_like(ids), np.zeros_like(ids))


class Models:
    """The runtimes being served, by name, and where the server is in its shutdown:
    `stopping` (from SIGTERM: not ready, connections closed after each answer, predictions
    still admitted for server.drain_delay_s), then `draining` (new predictions get 503)."""

    def __init__(self, metrics: Metrics) -> None:
        self._runtimes: dict[str, Runtime] = {}
        self.default: str | None = None
        self.stopping = False
        self.draining = False
        metrics.track_ready(lambda: self.ready)

    def add(self, runtime: Runtime) -> None:
        """Serve `runtime`; the first one added is the default model."""
        self._runtimes[runtime.name] = runtime
        if self.default is None:
            self.default = runtime.name

    def find(self, name: str | None = None) -> Runtime | None:
        """The named runtime (the default one without a name), or None if not loaded."""
        return self._runtimes.get(name or self.default or "")

    def get(self, name: str | None = None) -> Runtime:
        """The runtime to predict with, or 503 while loading or draining."""
        if self.draining:
            raise Draining()
        runtime = self.find(name)
        if runtime is None:
            raise NotReady()
        return runtime

    @property
    def ready(self) -> bool:
        return not self.stopping and bool(self._runtimes) and all(r.ready for r in self._runtimes.values())

    def alive(self, hang_s: float) -> bool:
        """Every batcher loop runs (or is draining) and no model run has lasted `hang_s`."""
        if self.stopping:
            return True
        return all(r.batcher.alive and r.batcher.longest_run_s < hang_s for r in self._runtimes.values())

    @property
    def unanswered(self) -> int:
        return sum(runtime.batcher.unanswered for runtime in self._runtimes.values())

    def begin_stopping(self) -> None:
        """Readiness drops (load balancers stop routing here); predictions are still admitted."""
        self.stopping = True

    def begin_drain(self) -> None:
        """New predictions get 503 from now on; queued work runs at once."""
        self.stopping = self.draining = True
        for runtime in self._runtimes.values():
            runtime.batcher.begin_drain()

    async def drain(self, timeout_s: float) -> None:
        """Answer everything admitted within `timeout_s` (503 for what is left then), stop the workers."""
        self.begin_drain()
        await asyncio.gather(*(runtime.batcher.close(timeout_s) for runtime in self._runtimes.values()))
