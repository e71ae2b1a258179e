"""HTTP handlers: parse and validate, tokenize, hand to the batcher, render with orjson.

Handlers never block: the only per-request work on the loop is JSON parsing, validation
and tokenizing one short text (~10-20 µs); everything batch-sized runs in the batcher's
worker thread.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from batcher.batching import Prediction
from batcher.errors import InvalidJSON, NotReady, PayloadTooLarge, RequestTimeout
from batcher.schemas import BatchPredictRequest, PredictRequest, validate
from batcher.service import Service

SERVICE = web.AppKey("service", Service)
OPENAPI = web.AppKey("openapi", dict)
SERVICE_TITLE = "batcher: 意图识别 ONNX 推理服务"
STARTED = web.RequestKey("started", float)
TIMING_HEADERS = ("x-queue-time-ms", "x-inference-time-ms", "x-batch-size")


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def index(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return json_response(
        {
            "status": "ok",
            "service": SERVICE_TITLE,
            "model_loaded": service.batcher is not None,
            "model": service.name,
            "provider": service.provider,
            "ready": service.ready,
            "draining": service.draining,
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    if service.draining:
        raise NotReady("server is shutting down")
    if not service.ready:
        raise NotReady("model is not loaded, not warm, or its last run failed")
    return json_response({"status": "ready"})


async def intents(request: web.Request) -> web.Response:
    labels = request.app[SERVICE].labels
    return json_response({"intents": [{"id": index, "name": name} for index, name in enumerate(labels)]})


async def predict(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.authorize(request.headers.get("Authorization"))
    encoder, batcher = service.require_batcher()
    batcher.check_admission()
    body = validate(PredictRequest, await read_json(request))
    prediction = await batcher.submit(service.encode(encoder, body))
    result = render(service, body, prediction, request[STARTED])
    return json_response(result, headers=timing_headers(prediction))


async def predict_batch(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.authorize(request.headers.get("Authorization"))
    encoder, batcher = service.require_batcher()
    body = validate(BatchPredictRequest, await read_json(request))
    limit = service.settings.server.max_batch_items
    if len(body.items) > limit:
        raise PayloadTooLarge(f"items: {len(body.items)} items, more than max_batch_items ({limit})")
    encoded = [service.encode(encoder, item) for item in body.items]
    futures: list[asyncio.Future[Prediction]] = []
    try:
        for row in encoded:
            futures.append(batcher.submit(row))
        predictions = await asyncio.gather(*futures)
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    started = request[STARTED]
    return json_response(
        {"results": [render(service, item, p, started) for item, p in zip(body.items, predictions, strict=True)]}
    )


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[SERVICE].metrics.registry
    return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


async def read_json(request: web.Request) -> Any:
    """The parsed body: 413 past client_max_size (checked before reading), 408 if it arrives
    slower than body_read_timeout_s, 400 if not JSON."""
    server = request.app[SERVICE].settings.server
    limit = server.client_max_size_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is {request.content_length} bytes, more than the {limit} allowed")
    try:
        if request.content.is_eof():  # the whole body came with the headers: no timer needed
            raw = await request.read()
        else:
            async with asyncio.timeout(server.body_read_timeout_s):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is more than the {limit} bytes allowed") from None
    except TimeoutError:
        raise RequestTimeout(f"request body did not arrive within {server.body_read_timeout_s:g} s") from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {str(exc)[:120]}") from None


def render(service: Service, body: PredictRequest, prediction: Prediction, started: float) -> dict[str, Any]:
    labels = service.labels
    result: dict[str, Any] = {
        "intent_id": prediction.intent_id,
        "intent_name": labels[prediction.intent_id],
        "confidence": round(prediction.confidence, 4),
        "inference_time_ms": round(prediction.inference_ms, 2),
    }
    if body.return_all_probs:
        result["probabilities"] = {
            name: round(p, 4) for name, p in zip(labels, prediction.probabilities.tolist(), strict=True)
        }
    result["timing"] = {
        "queue_ms": round(prediction.queue_ms, 3),
        "inference_ms": round(prediction.inference_ms, 3),
        "total_ms": round((time.perf_counter() - started) * 1000, 3),
        "batch_size": prediction.batch_size,
    }
    return result


def timing_headers(prediction: Prediction) -> dict[str, str]:
    queue, inference, batch_size = TIMING_HEADERS
    return {
        queue: f"{prediction.queue_ms:.3f}",
        inference: f"{prediction.inference_ms:.3f}",
        batch_size: str(prediction.batch_size),
    }
