"""HTTP handlers: parse and validate, tokenize, hand to the batcher, render with orjson.

A prediction walks down once: the queue's room (429, before any parsing), the body
(400/413/422), the model's runtime (404/503; taken after the body is read, with no await
until its batcher has the rows, so a reload in between hands over the new version and
never a closing one), the model's reader (its input format and tokenizer), the cache,
the batcher, the response in the request's shape.
Handlers never block: the only per-request work on the loop is JSON parsing, validation,
building the model's text and (batching.tokenize_on) tokenizing it (~5 µs);
everything batch-sized runs on a worker thread.

/predict takes three shapes: the seed's `{"turns": [...]}`, `{"text": ..., "text_pair": ...}`
(both answered with the seed's fields), and the text-embeddings-inference / Hugging Face
`{"inputs": ...}` (answered with every label and its score).
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

from batcher import __version__
from batcher.auth import Access
from batcher.batching import Prediction
from batcher.config import LogSettings, ServerSettings, Settings
from batcher.errors import (
    DeadlineExceeded,
    InvalidBody,
    InvalidJSON,
    NotReady,
    PayloadTooLarge,
    ReloadFailed,
    RequestTimeout,
    Unhealthy,
    ValidationFailed,
    snippet,
)
from batcher.metrics import CONTENT_TYPE, Metrics
from batcher.model.heads import Function
from batcher.model.tokenization import Text
from batcher.promises import NORMAL, PLAIN, Promise, adjusted, lowered, priority_of, promise_of
from batcher.runtime import Models, Runtime
from batcher.schemas import InputsRequest, PredictRequest, TextRequest, validate

Query = PredictRequest | TextRequest | InputsRequest
"""A validated prediction request, in one of its shapes."""
Item = PredictRequest | TextRequest

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
PRIORITY = "x-priority"
"""A request's priority (high, normal, low): batcher/promises.py."""
DEADLINE = "x-deadline-ms"
"""A request's own deadline, in milliseconds from its arrival: batcher/promises.py."""


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


async def index(request: web.Request) -> web.Response:
    models = request.app[MODELS]
    runtime = models.find()
    return json_response(
        {
            "status": "ok",
            "service": SERVICE_TITLE,
            "version": __version__,
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
    priority, deadline = request.headers.get(PRIORITY), request.headers.get(DEADLINE)
    models.get(name).batcher.check_admission(1, door(priority))  # 429 before any parsing
    data = await read_json(request, settings.server, batch=False)
    runtime, body, promise, waiting = start_prediction(models, name, data, priority, deadline, request[STARTED])
    outcome = await waiting  # cancelling this handler cancels it
    result, headers = finish_prediction(
        settings.log, request[REQUEST_ID], runtime, body, outcome, request[STARTED], promise
    )
    return json_response(result, headers=headers)


def door(priority: str | None, demoted: bool = False) -> int:
    """The priority a request's header gives, for the check at the door (before its body);
    one lower when `demoted` (batcher/fastpath.py's DEMOTED_S)."""
    level = NORMAL if priority is None else priority_of(priority)
    return lowered(level) if demoted else level


def start_prediction(
    models: Models,
    name: str | None,
    data: Any,
    priority: str | None = None,
    deadline: str | None = None,
    started: float | None = None,
    *,
    demoted: bool = False,
    fresh: bool = False,
    checked_at: int | None = None,
) -> tuple[Runtime, Query, Promise, asyncio.Future[Any]]:
    """A parsed /predict body admitted: its model's runtime (taken here, after the last await
    before admission: see the module's docstring), the validated request, its promise, and
    its pending prediction (the batcher's future; with the cache or several inputs, a task
    giving a list). `priority` and `deadline`: the x-priority and x-deadline-ms headers' values;
    `started`: when the request arrived (a client deadline counts from it); `demoted`: queued
    one priority lower than it asks (a retry storm's connection, batcher/fastpath.py); `fresh`:
    its client had no answer in the last second (promises.FRESH_S); `checked_at`: the priority
    the request was admitted at the door with in this same loop callback (`Batcher.submit`)."""
    runtime = models.get(name)
    body = query(data)
    promise = promise_of(priority, deadline, body.priority, body.deadline_ms)
    promise = adjusted(promise, demoted, fresh)
    rows = encode(runtime, body)
    if runtime.cache is None and len(rows) == 1:
        return runtime, body, promise, runtime.batcher.submit(rows[0], promise, started, checked_at=checked_at)
    return runtime, body, promise, asyncio.ensure_future(predict_rows(runtime, rows, promise, started))


def query(data: Any) -> Query:
    """The request's shape, told by its keys, validated: `inputs`, `text`, else `turns`."""
    if isinstance(data, dict):
        if "inputs" in data:
            return validate(InputsRequest, data)
        if "text" in data:
            if "turns" in data:
                raise ValidationFailed("body: send turns or text, not both")
            return validate(TextRequest, data)
    return validate(PredictRequest, data)


def item(data: Any, where: str = "") -> Item:
    """One /predict/batch item (`where` prefixes its errors): a dialogue or a text (or pair)."""
    try:
        if isinstance(data, dict) and "text" in data and "turns" not in data:
            return validate(TextRequest, data)
        return validate(PredictRequest, data)
    except ValidationFailed as error:
        raise ValidationFailed(f"{where}{error.message}") from None


def finish_prediction(
    settings: LogSettings,
    request_id: str,
    runtime: Runtime,
    body: Query,
    outcome: Prediction | list[Prediction],
    started: float,
    promise: Promise = PLAIN,
) -> tuple[Any, dict[str, str]]:
    """What /predict answers for a prediction (`start_prediction`'s outcome): the body and
    its headers; the answer goes to the prediction log. Past the client's own deadline
    once rendered (the loop may have been busy since the run ended): 504, never a late 200."""
    predictions = outcome if isinstance(outcome, list) else [outcome]
    prediction = predictions[0]
    headers = {**timing_headers(prediction), MODEL_VERSION: runtime.version}
    if isinstance(body, InputsRequest):
        result = render_scores(runtime, body, predictions)
    else:
        result = render(runtime, body, prediction, started)
    in_time(runtime, promise, started)
    log_predictions(settings, request_id, runtime, [body], predictions)
    return result, headers


def in_time(runtime: Runtime, promise: Promise, started: float) -> None:
    """504 when a request with its own deadline is past it (from its arrival, `started`)."""
    if promise.deadline_s is not None and time.perf_counter() - started > promise.deadline_s:
        runtime.metrics.rejected["deadline"].inc()
        raise DeadlineExceeded("the answer was ready after the request's deadline")


async def predict_batch(request: web.Request) -> web.Response:
    """POST /predict/batch (the default model) and /models/{name}/predict/batch."""
    data = await read_json(request, request.app[SETTINGS].server, batch=True)
    runtime = request.app[MODELS].get(request.match_info.get("name"))
    if not isinstance(data, dict) or not isinstance(data.get("items"), list) or not data["items"]:
        raise ValidationFailed("items: expected a non-empty list of dialogues or texts")
    items = [item(entry, f"items.{index}.") for index, entry in enumerate(data["items"])]
    headers = request.headers
    promise = promise_of(headers.get(PRIORITY), headers.get(DEADLINE), data.get("priority"), data.get("deadline_ms"))
    rows = [row for entry in items for row in encode(runtime, entry)]
    predictions = await predict_rows(runtime, rows, promise, request[STARTED])
    started = request[STARTED]
    results = [render(runtime, entry, p, started) for entry, p in zip(items, predictions, strict=True)]
    in_time(runtime, promise, started)
    log_predictions(request.app[SETTINGS].log, request[REQUEST_ID], runtime, items, predictions)
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


async def predict_rows(
    runtime: Runtime, rows: list[Text], promise: Promise = PLAIN, started: float | None = None
) -> list[Prediction]:
    """Each row's prediction, from the cache or a model run; rows to compute are admitted
    together or not at all (429/413)."""
    cache = runtime.cache
    batcher = runtime.batcher
    if cache is None:
        if len(rows) == 1:
            return await gathered([batcher.submit(rows[0], promise, started)])
        return await gathered(batcher.submit_all(rows, promise, started))
    keys = [row.key for row in rows]  # what the model reads: equal inputs, equal answers
    found: list[Prediction | None] = [cache.get(key) for key in keys]
    missing = [index for index, hit in enumerate(found) if hit is None]
    runtime.metrics.cache_hits.inc(len(rows) - len(missing))
    runtime.metrics.cache_misses.inc(len(missing))
    computed = await gathered(batcher.submit_all([rows[i] for i in missing], promise, started)) if missing else []
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
    bodies: Sequence[Query],
    predictions: Sequence[Prediction],
) -> None:
    """One JSON line per sampled answer (log.predictions): the text only with log.prediction_text."""
    if not settings.predictions:
        return
    inputs: list[Query | tuple[str, str | None]] = []
    for body in bodies:  # an `inputs` request has one answer per input
        inputs.extend(body.texts() if isinstance(body, InputsRequest) else [body])
    for given, prediction in zip(inputs, predictions, strict=True):
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
            if isinstance(given, PredictRequest):
                record["turns"] = [{"speaker": turn.speaker, "text": turn.text} for turn in given.turns]
            elif not isinstance(given, InputsRequest):
                text, pair = (given.text, given.text_pair) if isinstance(given, TextRequest) else given
                record["text"] = text
                if pair is not None:
                    record["text_pair"] = pair
        predictions_log.info(orjson.dumps(record).decode())


def check_sizes(data: Any, server: ServerSettings, *, batch: bool = False) -> None:
    """413 for a body over the item, turn or text limits, checked on the parsed JSON before
    the schema walks it: a legal body of 10,000 tiny items costs a count, not a
    validation. Shapes are left to the schema."""
    if isinstance(data, dict) and "turns" not in data and ("text" in data or "inputs" in data):
        _check_texts(data, server)
        return
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
            if isinstance(dialogue, dict):  # a text item
                _check_texts(dialogue, server, where)
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


def _check_texts(data: dict[str, Any], server: ServerSettings, where: str = "") -> None:
    """The limits for `{"text", "text_pair"}` and `{"inputs"}`: max_text_chars a text,
    max_batch_items inputs."""
    limit = server.max_text_chars
    for key in ("text", "text_pair"):
        value = data.get(key)
        if isinstance(value, str) and len(value) > limit:
            raise PayloadTooLarge(f"{where}{key}: {len(value)} characters, more than max_text_chars ({limit})")
    inputs = data.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    if not isinstance(inputs, list):
        return
    if len(inputs) > server.max_batch_items:
        raise PayloadTooLarge(f"inputs: {len(inputs)} inputs, more than max_batch_items ({server.max_batch_items})")
    for index, entry in enumerate(inputs):
        for text in entry if isinstance(entry, list) else [entry]:
            if isinstance(text, str) and len(text) > limit:
                raise PayloadTooLarge(f"inputs.{index}: {len(text)} characters, more than max_text_chars ({limit})")


def encode(runtime: Runtime, body: Query) -> list[Text]:
    """The request's inputs as the model reads them (one for turns or a text, one per input
    of `inputs`); tokenized here (timed into batcher_tokenize_duration_seconds) unless a
    worker thread does it with its batch."""
    encoder, on_loop = runtime.encoder, runtime.tokenize_on_loop
    started = time.perf_counter()
    if isinstance(body, PredictRequest):
        rows = [encoder.prepare([(turn.speaker, turn.text) for turn in body.turns], tokenize=on_loop)]
    elif isinstance(body, TextRequest):
        rows = [encoder.prepare_text(body.text, body.text_pair, tokenize=on_loop)]
    else:
        side = body.truncation_direction.lower() if body.truncation_direction else None
        truncate = body.truncate is not False
        rows = [
            encoder.prepare_text(text, pair, side=side, truncate=truncate, tokenize=on_loop)  # type: ignore[arg-type]
            for text, pair in body.texts()
        ]
    if on_loop:
        runtime.metrics.tokenize.observe(time.perf_counter() - started)
    return rows


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


def render(runtime: Runtime, body: Item, prediction: Prediction, started: float) -> dict[str, Any]:
    """The old service's response plus `timing` (which says `cached: true` for an answer
    from the cache); a multi-label model's `labels`; an abstained answer's fallback label
    and best guess."""
    labels, head = runtime.labels, runtime.head
    result: dict[str, Any] = {
        "intent_id": prediction.intent_id,
        "intent_name": labels[prediction.intent_id],
        "confidence": round(prediction.confidence, 4),
        "inference_time_ms": round(prediction.inference_ms, 2),
    }
    if head.abstain_threshold and prediction.confidence < head.abstain_threshold and not head.multi_label:
        result["intent_id"], result["intent_name"] = -1, head.abstain_label
        result["abstained"] = True
        result["best_guess"] = {"id": prediction.intent_id, "name": labels[prediction.intent_id]}
    if head.multi_label:
        scores = prediction.probabilities.tolist()
        chosen = sorted((i for i, p in enumerate(scores) if p >= head.threshold), key=lambda i: -scores[i])
        result["labels"] = [{"label": labels[i], "score": round(scores[i], 4)} for i in chosen]
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


def render_scores(runtime: Runtime, body: InputsRequest, predictions: Sequence[Prediction]) -> Any:
    """The text-embeddings-inference / Hugging Face answer: each input's labels with their
    scores, highest first (`top_k` of them); a list of those for a batch, and for a single
    input sent with `parameters` (the Hugging Face Inference API's shape, which
    `huggingface_hub` reads) a list of one."""
    parameters = body.parameters
    function: Function | None = "none" if body.raw_scores else None
    top_k = None
    if parameters is not None:
        function = parameters.function_to_apply or function
        top_k = parameters.top_k
    labels, head = runtime.labels, runtime.head
    answers = []
    for prediction in predictions:
        scores = prediction.probabilities
        if function is not None and function != head.function and prediction.logits is not None:
            scores = head.apply(prediction.logits[None, :], function)[0]
        values = scores.tolist()
        order = sorted(range(len(values)), key=lambda index: -values[index])[:top_k]
        answers.append([{"label": labels[index], "score": values[index]} for index in order])
    if body.batch:
        return answers
    return [answers[0]] if parameters is not None else answers[0]
