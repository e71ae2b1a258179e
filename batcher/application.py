"""The aiohttp application: routes, middleware, and the lifecycle in one cleanup context.

Start-up loads and checks the bundle, creates the session, warms it over several batch
sizes and lengths, then starts the batcher; shutdown unwinds in reverse, draining the
queue before the workers stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from functools import partial

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path

from batcher import __version__, handlers
from batcher.batching import Batcher
from batcher.config import Settings
from batcher.handlers import OPENAPI, SERVICE, SERVICE_TITLE
from batcher.metrics import Metrics
from batcher.middleware import errors, observe
from batcher.model import Model, OnnxModel, load_bundle, warm_up
from batcher.openapi import SWAGGER_PAGE, build_openapi
from batcher.service import Service
from batcher.tokenization import TextEncoder

log = logging.getLogger(__name__)
WARMUP_BATCH_SIZES = (1, 4)
WARMUP_LENGTHS = (8, 32)


def create_app(settings: Settings, *, metrics: Metrics | None = None, model: Model | None = None) -> web.Application:
    """The app; `model` replaces the bundle's ONNX session (tests of timing use a fake)."""
    app = web.Application(client_max_size=settings.server.client_max_size_bytes, middlewares=[observe, errors])
    app[SERVICE] = Service(settings, metrics or Metrics())
    app[OPENAPI] = build_openapi(SERVICE_TITLE, __version__)
    app.router.add_get("/", handlers.index)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/intents", handlers.intents)
    app.router.add_post("/predict", handlers.predict)
    app.router.add_post("/predict/batch", handlers.predict_batch)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/openapi.json", handlers.openapi)
    app.router.add_get("/docs", docs)
    app.router.add_static("/docs/static", swagger_ui_path)
    app.cleanup_ctx.append(partial(lifecycle, model=model))
    return app


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=SWAGGER_PAGE, content_type="text/html")


async def lifecycle(app: web.Application, *, model: Model | None) -> AsyncIterator[None]:
    service = app[SERVICE]
    settings = service.settings
    loop = asyncio.get_running_loop()
    bundle = await loop.run_in_executor(None, load_bundle, settings.model_dir, settings.model.file)
    encoder = await loop.run_in_executor(None, TextEncoder.from_bundle, bundle.directory, settings.model.max_seq_len)
    if model is None:
        model = await loop.run_in_executor(None, OnnxModel, bundle, settings.model)
    log.info("model %s (sha256 %s) runs on %s", bundle.name, bundle.sha256[:12], model.provider)
    batch_sizes = sorted({*WARMUP_BATCH_SIZES, settings.batching.max_batch_size})
    lengths = sorted({*WARMUP_LENGTHS, settings.model.max_seq_len})
    await loop.run_in_executor(
        None,
        partial(
            warm_up,
            model,
            pad_id=encoder.pad_id,
            batch_sizes=batch_sizes,
            lengths=lengths,
            runs=settings.model.warmup_runs,
        ),
    )
    batcher = Batcher(
        model, settings=settings.batching, metrics=service.metrics, pad_id=encoder.pad_id, num_labels=len(bundle.labels)
    )
    service.bundle, service.encoder, service.provider = bundle, encoder, model.provider
    service.metrics.describe_model(
        {
            "name": service.name,
            "sha256": bundle.sha256[:12],
            "provider": model.provider,
            "labels": str(len(bundle.labels)),
            **settings.describe(),
        }
    )
    batcher.start()
    service.batcher = batcher
    service.warm = True
    service.metrics.ready.set(1)
    try:
        yield
    finally:
        service.begin_drain()
        await batcher.close(settings.server.shutdown_timeout_s)
