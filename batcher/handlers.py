"""HTTP handlers: parse and validate, tokenize, hand to the batcher, render with orjson.

A prediction walks down once: the queue's room (429, before any parsing), the body
(400/413/422), the model's runtime (404/503; taken after the body is read, with no await
until its batcher has the rows, so a reload in between hands over the new version and
never a closing one), the tokenizer, the cache, the batcher, the response.
Handlers never block: the only per-request work on the loop is JSON parsing, validation,
building the dialogue's text and (batching.tokenize_on) tokenizing it (~5 µs);
everything batch-sized runs on a worker thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import random
import signal
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web, web_protocol

from batcher.auth import Access
from batcher.batching import Prediction
from batcher.config import LogSettings, ServerSettings, Settings
from batcher.errors import (
    InvalidBody,
    InvalidJSON,
    NotReady,
    PayloadTooLarge,
    ReloadFailed,
    RequestTimeout,
    Unhealthy,
    snippet,
)
from batcher.metrics import CONTENT_TYPE, Metrics
from batcher.runtime import Models, Runtime
from batcher.schemas import BatchPredictRequest, PredictRequest, validate
from batcher.tokenization import Text

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
MODELS = web.AppKey("models", Models)
ACCESS = web.AppKey("access", Access)
"""Who may call the predict routes: bearer tokens and allowed origins."""
OPENAPI = web.AppKey("openapi", dict)
SERVICE_TITLE = "batcher: 意图识别 ONNX 推理服务"
STARTED = web.RequestKey("started", float)
REQUEST_ID = web.RequestKey("request_id", str)
predictions_log = logging.getLogger("batcher.predictions")
LARGE_BODY_BYTES = 64 * 1024
TIMING_HEADERS = ("x-queue-time-ms", "x-inference-time-ms", "x-batch-size")
MODEL_VERSION = "x-model-version"


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def index(request: web.Request) -> web.Response:
    models = request.app[MODELS]
    runtime = models.find()
    return json_response(
        {
            "status": "ok",
            "service": SERVICE_TITLE,
            "model_loaded": runtime is not None,
            "model": runtime.name if runtime else "",
            "provider": runtime.provider if runtime else "none",
            "ready": models.ready,
            "draining": models.stopping,
        }
    )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 503 once a model run has hung for server.liveness_hang_s, or a batcher
    loop has stopped; a restart is the only cure for either."""
    if not request.app[MODELS].alive(request.app[SETTINGS].server.liveness_hang_s):
        raise Unhealthy()
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    models = request.app[MODELS]
    if models.stopping:
        raise NotReady("server is shutting down")
    if not models.ready:
        raise NotReady("model is not loaded, not warm, or its last run failed")
    return json_response({"status": "ready"})


async def intents(request: web.Request) -> web.Response:
    """The default model's intents, or /models/{name}/intents."""
    runtime = request.app[MODELS].find(request.match_info.get("name"))
    if runtime is None:
        request.app[MODELS].get(request.match_info.get("name"))  # 404 for an unknown name, else 503
        raise NotReady()
    return json_response({"intents": [{"id": index, "name": name} for index, name in enumerate(runtime.labels)]})


async def models(request: web.Request) -> web.Response:
    served = request.app[MODELS]
    described = []
    for name in served.names:
        runtime = served.find(name)
        described.append(runtime.describe() if runtime else {"name": name, "ready": False})
    return json_response({"default": served.default, "models": described})


async def predict(request: web.Request) -> web.Response:
    """POST /predict (the default model) and /models/{name}/predict."""
    name = request.match_info.get("name")
    app = request.app
    models, settings = app[MODELS], app[SETTINGS]
    models.get(name).batcher.check_admission()  # 429 before any parsing
    data = await read_json(request, settings.server, batch=False)
    runtime, body, waiting = start_prediction(models, name, data)
    outcome = await waiting  # cancelling this handler cancels it
    result, headers = finish_prediction(settings.log, request[REQUEST_ID], runtime, body, outcome, request[STARTED])
    return json_response(result, headers=headers)


def start_prediction(
    models: Models, name: str | None, data: Any
) -> tuple[Runtime, PredictRequest, asyncio.Future[Any]]:
    """A parsed /predict body admitted: its model's runtime (taken here, after the last await
    before admission: see the module's docstring), the validated request, and its pending
    prediction (the batcher's future; with the cache, a task giving a list of one)."""
    runtime = models.get(name)
    body = validate(PredictRequest, data)
    row = encode(runtime, body)
    if runtime.cache is None:
        return runtime, body, runtime.batcher.submit(row)
    return runtime, body, asyncio.ensure_future(predict_rows(runtime, [row]))


def finish_prediction(
    settings: LogSettings,
    request_id: str,
    runtime: Runtime,
    body: PredictRequest,
    outcome: Prediction | list[Prediction],
    started: float,
) -> tuple[dict[str, Any], dict[str, str]]:
    """What /predict answers for a prediction (`start_prediction`'s outcome): the body and
    its headers; the answer goes to the prediction log."""
    prediction = outcome[0] if isinstance(outcome, list) else outcome
    log_predictions(settings, request_id, runtime, [body], [prediction])
    headers = {**timing_headers(prediction), MODEL_VERSION: runtime.version}
    return render(runtime.labels, body, prediction, started), headers


async def predict_batch(request: web.Request) -> web.Response:
    """POST /predict/batch (the default model) and /models/{name}/predict/batch."""
    data = await read_json(request, request.app[SETTINGS].server, batch=True)
    runtime = request.app[MODELS].get(request.match_info.get("name"))
    body = validate(BatchPredictRequest, data)
    predictions = await predict_rows(runtime, [encode(runtime, item) for item in body.items])
    log_predictions(request.app[SETTINGS].log, request[REQUEST_ID], runtime, body.items, predictions)
    started = request[STARTED]
    results = [render(runtime.labels, item, p, started) for item, p in zip(body.items, predictions, strict=True)]
    return json_response({"results": results}, headers={MODEL_VERSION: runtime.version})


async def reload(request: web.Request) -> web.Response:
    """POST /models/{name}/reload (server.admin_enabled): re-read the bundle from disk. With
    several workers, this one reloads and asks the parent to have the others do the same."""
    name = request.match_info["name"]
    result = await request.app[MODELS].reload(name)
    workers = request.app[SETTINGS].server.workers
    if workers > 1:
        os.kill(os.getppid(), signal.SIGHUP)  # the parent passes it to every worker: each reloads what changed
        result["workers"] = f"this worker; the parent relays SIGHUP to all {workers}"
    if result["status"] == "failed":
        error = ReloadFailed(
            f"model {name}: the new bundle did not load; version {result['version']} keeps serving: {result['reason']}"
        )
        return json_response({**error.body(), **result}, status=error.status)
    return json_response(result)


async def predict_rows(runtime: Runtime, rows: list[Text]) -> list[Prediction]:
    """Each row's prediction, from the cache or a model run; rows to compute are admitted
    together or not at all (429/413)."""
    cache = runtime.cache
    if cache is None:
        futures = [runtime.batcher.submit(rows[0])] if len(rows) == 1 else runtime.batcher.submit_all(rows)
        return await gathered(futures)
    keys = [row.text for row in rows]  # the text the model reads: equal texts, equal answers
    found: list[Prediction | None] = [cache.get(key) for key in keys]
    missing = [index for index, hit in enumerate(found) if hit is None]
    runtime.metrics.cache_hits.inc(len(rows) - len(missing))
    runtime.metrics.cache_misses.inc(len(missing))
    computed = await gathered(runtime.batcher.submit_all([rows[index] for index in missing])) if missing else []
    for index, prediction in zip(missing, computed, strict=True):
        cache.put(keys[index], prediction)
        found[index] = prediction
    return [
        prediction
        if index in missing
        else dataclasses.replace(prediction, queue_ms=0.0, inference_ms=0.0, batch_size=0, cached=True)
        for index, prediction in enumerate(found)
        if prediction is not None
    ]


async def gathered(futures: list[asyncio.Future[Prediction]]) -> list[Prediction]:
    """Every future's prediction; on any failure or cancellation the others are cancelled."""
    if len(futures) == 1:
        return [await futures[0]]  # cancelling the awaiting task cancels the future
    try:
        return list(await asyncio.gather(*futures))
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def log_predictions(
    settings: LogSettings,
    request_id: str,
    runtime: Runtime,
    bodies: Sequence[PredictRequest],
    predictions: Sequence[Prediction],
) -> None:
    """One JSON line per sampled answer (log.predictions): the text only with log.prediction_text."""
    if not settings.predictions:
        return
    for body, prediction in zip(bodies, predictions, strict=True):
        if settings.predictions < 1 and random.random() >= settings.predictions:
            continue
        record: dict[str, Any] = {
            "time": time.time(),
            "request_id": request_id,
            "model": runtime.name,
            "version": runtime.version,
            "intent": runtime.labels[prediction.intent_id],
            "intent_id": prediction.intent_id,
            "confidence": round(prediction.confidence, 4),
            "batch_size": prediction.batch_size,
            "queue_ms": round(prediction.queue_ms, 3),
            "inference_ms": round(prediction.inference_ms, 3),
            "cached": prediction.cached,
        }
        if settings.prediction_text:
            record["turns"] = [{"speaker": turn.speaker, "text": turn.text} for turn in body.turns]
        predictions_log.info(orjson.dumps(record).decode())


def check_sizes(data: Any, server: ServerSettings, *, batch: bool = False) -> None:
    """413 for a body over the item, turn or text limits, checked on the parsed JSON before
    the schema walks it: a legal body of 10,000 tiny items costs a count, not a
    validation. Shapes are left to the schema."""
    dialogues: Any = [data]
    if batch:
        dialogues = data.get("items") if isinstance(data, dict) else None
        if not isinstance(dialogues, list):
            return
        if len(dialogues) > server.max_batch_items:
            raise PayloadTooLarge(
                f"items: {len(dialogues)} items, more than max_batch_items ({server.max_batch_items})"
            )
    for number, dialogue in enumerate(dialogues):
        where = f"items.{number}." if batch else ""
        turns = dialogue.get("turns") if isinstance(dialogue, dict) else None
        if not isinstance(turns, list):
            continue
        if len(turns) > server.max_turns:
            raise PayloadTooLarge(f"{where}turns: {len(turns)} turns, more than max_turns ({server.max_turns})")
        for index, turn in enumerate(turns):
            text = turn.get("text") if isinstance(turn, dict) else None
            if isinstance(text, str) and len(text) > server.max_text_chars:
                raise PayloadTooLarge(
                    f"{where}turns.{index}.text: {len(text)} characters, more than max_text_chars "
                    f"({server.max_text_chars})"
                )


def encode(runtime: Runtime, body: PredictRequest) -> Text:
    """The dialogue's text as the model reads it; tokenized here (timed into
    batcher_tokenize_duration_seconds) unless a worker thread does it with its batch."""
    turns = [(turn.speaker, turn.text) for turn in body.turns]
    if not runtime.tokenize_on_loop:
        return runtime.encoder.prepare(turns, tokenize=False)
    started = time.perf_counter()
    text = runtime.encoder.prepare(turns)
    runtime.metrics.tokenize.observe(time.perf_counter() - started)
    return text


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


async def read_json(request: web.Request, server: ServerSettings, *, batch: bool) -> Any:
    """The parsed body (`read_body`), 400 if not JSON, 413 over the item, turn or text
    limits (`check_sizes`)."""
    raw = await read_body(request, server)
    if len(raw) < LARGE_BODY_BYTES:
        return parsed(raw, server, batch=batch)
    # A large body can hold ~80,000 tiny objects. With the collector on, young collections
    # walk them over and over while they are built, and once more after: 41,000 tiny items
    # took 40 ms to parse, 15 without. Parsed JSON holds no cycles (refcounting frees it),
    # and one refused for size is freed before the collector is back on.
    gc.disable()
    try:
        data = _parse(raw)
        check_sizes(data, server, batch=batch)
        return data
    except PayloadTooLarge as error:
        data = None  # freed now, collector off; the traceback would keep it alive through check_sizes' frame
        raise error.with_traceback(None) from None
    finally:
        gc.enable()


async def read_body(request: web.Request, server: ServerSettings) -> bytes:
    """The body's bytes: 413 past client_max_size (checked before reading), 408 if it arrives
    slower than body_read_timeout_s, 400 if it cannot be decoded (a Content-Encoding or
    chunking that lies; the connection is then closed, its stream being unusable)."""
    limit = server.client_max_size_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is {request.content_length} bytes, more than the {limit} allowed")
    try:
        if request.content.is_eof():  # the whole body came with the headers: no timer needed
            return await request.read()
        async with asyncio.timeout(server.body_read_timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is more than the {limit} bytes allowed") from None
    except TimeoutError:
        raise RequestTimeout(f"request body did not arrive within {server.body_read_timeout_s:g} s") from None
    except web_protocol.RequestPayloadError as exc:
        request.content.feed_eof()  # nothing more will be read from it: aiohttp must not try again
        raise InvalidBody(f"request body cannot be read: {snippet(' '.join(str(exc).split()), 80)}") from None


def parsed(raw: bytes, server: ServerSettings, *, batch: bool) -> Any:
    """A small body parsed (400 if not JSON) and its sizes checked (413)."""
    data = _parse(raw)
    check_sizes(data, server, batch=batch)
    return data


def _parse(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"request body is not valid JSON: {str(exc)[:120]}") from None


def render(labels: list[str], body: PredictRequest, prediction: Prediction, started: float) -> dict[str, Any]:
    """The old service's response plus `timing` (which says `cached: true` for an answer
    from the cache)."""
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
    if prediction.cached:
        result["timing"]["cached"] = True
    return result


def timing_headers(prediction: Prediction) -> dict[str, str]:
    return {
        "x-queue-time-ms": f"{prediction.queue_ms:.3f}",
        "x-inference-time-ms": f"{prediction.inference_ms:.3f}",
        "x-batch-size": str(prediction.batch_size),
    }
