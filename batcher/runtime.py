"""What the HTTP layer serves: a `Runtime` per loaded, warm model, held by `Models`.

`load_runtime` builds a Runtime whole (bundle, tokenizer, session, warm-up, batcher, cache)
and it never changes afterwards: handlers only read it. `Models` holds the runtimes by
name and the server's shutdown state, drains them all in one place, and reloads one by
building its successor beside it and swapping the two in one step of the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from batcher import __version__
from batcher.batching import Batcher, Prediction
from batcher.config import ModelSettings, ModelSpec, Settings
from batcher.errors import (
    BundleError,
    Draining,
    HTTPError,
    ModelNotFound,
    NotReady,
    StartupCancelled,
    StartupError,
    snippet,
)
from batcher.metrics import Metrics, ModelMetrics
from batcher.model.bundle import ModelBundle, bundle_version, choose_graph, load_bundle
from batcher.model.formats import TextEncoder
from batcher.model.heads import Head, resolve_output
from batcher.model.session import CUDA, OnnxModel, final_op, first_line, usable_provider
from batcher.model.tokenization import Text
from batcher.worker import Model, Worker

log = logging.getLogger(__name__)
WARMUP_BATCH_SIZES = (1, 4)
WARMUP_LENGTHS = (8, 32)
T = TypeVar("T")


@dataclass(frozen=True)
class Runtime:
    """One model, loaded and warm, with the tokenizer, batcher and cache that serve it."""

    spec: ModelSpec
    bundle: ModelBundle
    encoder: TextEncoder
    """The model's reader: its input format and tokenizer."""
    head: Head
    """The model's output function and answer rules."""
    batcher: Batcher
    provider: str
    metrics: ModelMetrics
    cache: PredictionCache | None
    tokenize_on_loop: bool
    """batching.tokenize_on, resolved: "auto" is the loop on the CPU, the worker on CUDA."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> list[str]:
        return self.bundle.labels

    @property
    def version(self) -> str:
        """The bundle's content hash (graph, tokenizer, labels)."""
        return self.bundle.version

    @property
    def ready(self) -> bool:
        """Admitting, its loop alive, its last run good, and no run hung past the deadline."""
        batcher = self.batcher
        return batcher.accepting and batcher.alive and not batcher.last_run_failed and not batcher.stalled

    def describe(self) -> dict[str, object]:
        """What GET /models says of it."""
        return {
            "name": self.name,
            "version": self.version,
            "labels": self.labels,
            "ready": self.ready,
            "provider": self.provider,
            "file": self.bundle.model_path.relative_to(self.bundle.directory).as_posix(),
            "input": self.encoder.format.describe(),
            "output": self.head.describe(),
            "multi_label": self.head.multi_label,
        }


async def load_runtime(
    spec: ModelSpec,
    settings: Settings,
    metrics: Metrics,
    *,
    model: Model | None = None,
    cancelled: Callable[[], bool] = bool,
) -> Runtime:
    """Load, check and warm one model, then start its batcher. `model` replaces the bundle's
    ONNX session (tests about timing use a fake). Between steps, and between warm-up runs,
    `cancelled()` is asked whether a signal wants the server gone: then StartupCancelled."""
    loop = asyncio.get_running_loop()

    async def step(function: Callable[..., T], *args: Any) -> T:
        if cancelled():
            raise StartupCancelled()
        return await loop.run_in_executor(None, function, *args)

    directory, file = spec.directory, spec.model.file
    provider = None
    if model is None:  # the device decides the graph when model.file = "auto"
        probe = directory / choose_graph(directory, file, on_gpu=False)  # any graph tells whether CUDA runs
        provider = await step(usable_provider, spec.model, probe)
    file = choose_graph(directory, file, on_gpu=provider == CUDA)
    bundle = await step(load_bundle, directory, file, settings_key(spec.model))
    encoder = await step(TextEncoder.for_bundle, bundle, spec.model)
    named = resolve_output(spec.model.output, bundle.declared, problem_type=None, num_labels=len(bundle.labels))
    if model is None:
        session = await step(
            partial(OnnxModel, output=named.output, pad_id=encoder.pad_id), bundle, spec.model, provider
        )
        fixed = session.static_length
        if fixed is not None and fixed < encoder.max_seq_len:  # the graph takes no more: cut there
            log.warning(
                "model %s: the graph takes exactly %d tokens (a static sequence length), so inputs are cut at %d "
                "(and padded to it), not %d; set model.max_seq_len = %d to silence this",
                spec.name, fixed, fixed, encoder.max_seq_len, fixed,
            )  # fmt: skip
            encoder = await step(partial(TextEncoder.for_bundle, static_length=fixed), bundle, spec.model)
        await step(partial(session.check, max_length=encoder.max_seq_len, vocab_size=encoder.vocab_size))
        model, output = session, session.output
    else:
        output = named.output or "logits"
    last_op = await step(final_op, bundle.model_path, output)
    head = resolve_output(
        spec.model.output,
        bundle.declared,
        problem_type=bundle.problem_type,
        num_labels=len(bundle.labels),
        final_op=last_op,
    )
    graph = bundle.model_path.relative_to(bundle.directory).as_posix()
    log.info("model %s (%s, version %s) runs on %s", spec.name, graph, bundle.version, model.provider)
    log.info("model %s reads %s", spec.name, encoder.format.describe())
    log.info("model %s scores with %s", spec.name, head.describe())
    probe_row = sample_row(encoder, bundle)
    warm = partial(
        warm_up,
        model,
        pad_id=encoder.pad_id,
        batch_sizes=sorted({*WARMUP_BATCH_SIZES, spec.batching.max_batch_size}),
        lengths=sorted({*WARMUP_LENGTHS, encoder.max_seq_len}),
        runs=spec.model.warmup_runs,
        cancelled=cancelled,
    )
    try:
        await step(warm)
    except StartupCancelled:
        raise
    except Exception as exc:
        raise BundleError(
            f"{bundle.model_path}: warm-up failed in ONNX Runtime: {first_line(exc)} "
            "(check model.max_seq_len, batching.max_batch_size and model.file)"
        ) from None
    batching = spec.batching
    lone = None
    if batching.lone_threads and isinstance(model, OnnxModel) and model.provider != CUDA:
        threads = batching.lone_threads if batching.lone_threads > 0 else len(os.sched_getaffinity(0))
        solo = dataclasses.replace(spec.model, intra_op_threads=threads, allow_spinning=True)
        lone = await step(partial(OnnxModel, output=model.output, pad_id=encoder.pad_id), bundle, solo, model.provider)
        await step(partial(warm_up, lone, pad_id=encoder.pad_id, batch_sizes=[1], lengths=list(WARMUP_LENGTHS),
                           runs=spec.model.warmup_runs, cancelled=cancelled))  # fmt: skip
        log.info("model %s: a lone request runs on a second session of %d threads", spec.name, threads)
    worker = Worker(
        model,
        encode=encoder.encode_batch,
        instances=batching.instances,
        pad_id=encoder.pad_id,
        num_labels=len(bundle.labels),
        activate=head.apply,
        sched_idle=batching.worker_sched_idle,
        nice=batching.worker_nice,
        lone=lone,
    )
    model_metrics = metrics.for_model(spec.name)
    batcher = Batcher(worker, settings=batching, metrics=model_metrics, probe=probe_row)
    info = {
        "version": bundle.version,
        "file": graph,
        "sha256": bundle.sha256[:12],
        "provider": model.provider,
        "labels": str(len(bundle.labels)),
        "input_format": encoder.format.kind,
        "output_function": head.function,
        "batcher_version": __version__,
        **settings.describe(spec),
    }
    metrics.describe_model(spec.name, info)
    batcher.start()
    cache = PredictionCache(settings.cache.max_entries) if settings.cache.max_entries else None
    on_loop = spec.batching.tokenize_on == "loop" or (spec.batching.tokenize_on == "auto" and provider != CUDA)
    return Runtime(spec, bundle, encoder, head, batcher, model.provider, model_metrics, cache, on_loop)


def settings_key(settings: ModelSettings) -> str:
    """What of a model's settings decides its answers (in its version, with the bundle's files)."""
    chosen = {"max_seq_len": settings.max_seq_len, "input": settings.input, "output": settings.output}
    return repr(chosen)


SAMPLE_TEXT = "hello"
"""What warm-up's probe and the readiness probe read when the bundle's batcher.json has no
`sample`: a word any vocabulary tokenizes (into pieces or its unknown token)."""


def sample_row(encoder: TextEncoder, bundle: ModelBundle) -> Text:
    """A short input in the model's own format: batcher.json's `sample`, else SAMPLE_TEXT (a
    pair of it for a pair model)."""
    sample = bundle.declared.get("sample")
    text = sample if isinstance(sample, str) and sample.strip() else SAMPLE_TEXT
    try:
        return encoder.prepare_text(text)
    except HTTPError:  # a pair model
        return encoder.prepare_text(text, text)


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
    still admitted for server.drain_delay_s), then `draining` (new predictions get 503).
    A reload swaps one runtime for a new one in a single step of the loop."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._runtimes: dict[str, Runtime] = {}
        self._reloading: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.default = settings.model.name
        self.stopping = False
        self.draining = False

    def add(self, runtime: Runtime) -> None:
        self._runtimes[runtime.name] = runtime
        self._metrics.track_ready(runtime.name, lambda: self.model_ready(runtime.name))

    def find(self, name: str | None = None) -> Runtime | None:
        """The named runtime (the default one without a name), or None if not loaded."""
        return self._runtimes.get(name or self.default)

    def get(self, name: str | None = None) -> Runtime:
        """The runtime to predict with: 404 for a model not configured, 503 while loading
        or draining."""
        if self.draining:
            raise Draining()
        runtime = self.find(name)
        if runtime is None:
            if name is not None and name not in self.names:
                raise ModelNotFound(f"no model named {snippet(name)}; GET /models lists them")
            raise NotReady()
        return runtime

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self._settings.served]

    def loaded(self) -> list[Runtime]:
        return list(self._runtimes.values())

    def model_ready(self, name: str) -> bool:
        runtime = self._runtimes.get(name)
        return not self.stopping and runtime is not None and runtime.ready

    @property
    def ready(self) -> bool:
        return (
            not self.stopping
            and len(self._runtimes) == len(self.names)
            and all(runtime.ready for runtime in self._runtimes.values())
        )

    def alive(self, hang_s: float) -> bool:
        """Every batcher loop runs (or is draining) and no model run has lasted `hang_s`."""
        if self.stopping:
            return True
        return all(r.batcher.alive and r.batcher.longest_run_s < hang_s for r in self._runtimes.values())

    @property
    def unanswered(self) -> int:
        return sum(runtime.batcher.unanswered for runtime in self._runtimes.values())

    async def load_all(self, *, model: Model | None = None) -> None:
        """Load every configured model (`model` stands in for each one's session in tests)."""
        for spec in self._settings.served:
            runtime = await load_runtime(spec, self._settings, self._metrics, model=model, cancelled=self._stopped)
            self.add(runtime)

    def _stopped(self) -> bool:
        return self.stopping

    async def reload(self, name: str) -> dict[str, object]:
        """Re-read a model's bundle from disk. A new version is loaded and warmed beside the
        old one, takes new admissions in one step, and the old one answers what it admitted
        and is freed; the same version changes nothing; one that fails to load or warm leaves
        the old one serving, and says why."""
        old = self.get(name)
        lock = self._reloading.setdefault(name, asyncio.Lock())
        async with lock:
            old = self.get(name)
            try:  # a bad bundle on disk (even a removed one) must not take the served one down
                file = await asyncio.to_thread(
                    choose_graph, old.spec.directory, old.spec.model.file, on_gpu=old.provider == CUDA
                )
                key = settings_key(old.spec.model)
                version = await asyncio.to_thread(bundle_version, old.spec.directory, file, key)
                if version == old.version:
                    return {"model": name, "status": "unchanged", "version": version}
                new = await load_runtime(old.spec, self._settings, self._metrics, cancelled=self._stopped)
            except Exception as exc:
                reason = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
                log.error("reloading model %s failed; version %s keeps serving: %s", name, old.version, reason)
                return {"model": name, "status": "failed", "version": old.version, "reason": snippet(reason, 300)}
            if self.draining:  # shutting down meanwhile: the new one never serves
                await new.batcher.close(0)
                return {"model": name, "status": "failed", "version": old.version, "reason": "shutting down"}
            self._runtimes[name] = new
            log.info("model %s: version %s now serves (was %s)", name, new.version, old.version)
            retiring = asyncio.get_running_loop().create_task(self._retire(old))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
            return {"model": name, "status": "reloaded", "version": new.version, "previous": old.version}

    async def reload_all(self) -> list[dict[str, object]]:
        return [await self.reload(runtime.name) for runtime in self.loaded()]

    async def _retire(self, runtime: Runtime) -> None:
        await runtime.batcher.close(self._settings.server.shutdown_timeout_s)
        log.info("model %s: version %s retired", runtime.name, runtime.version)

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
        closing = [runtime.batcher.close(timeout_s) for runtime in self._runtimes.values()]
        await asyncio.gather(*closing, *self._retiring)


class PredictionCache:
    """Answers by what the model reads (`Text.key`: its token ids, or its texts when the
    worker tokenizes), least recently used out first (one per runtime, so one version)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[object, Prediction] = OrderedDict()

    def get(self, key: object) -> Prediction | None:
        prediction = self._entries.get(key)
        if prediction is not None:
            self._entries.move_to_end(key)
        return prediction

    def put(self, key: object, prediction: Prediction) -> None:
        self._entries[key] = prediction
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
