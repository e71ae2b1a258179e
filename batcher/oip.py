"""The Open Inference Protocol (KServe v2) over HTTP, on the same models and batchers.

Routes: GET /v2, /v2/health/live, /v2/health/ready, /v2/models/{name},
/v2/models/{name}/ready, and POST /v2/models/{name}/infer. The infer request carries one
BYTES input, `text`, of shape [N] or [N, 1]: each element is one input, read in the model's
own format (`/predict`'s): a user's text, or a JSON object, either {"turns": [{"speaker":
..., "text": ...}, ...]} (a dialogue, oldest turn first) or {"text": ..., "text_pair": ...}
(a pair). Its data comes as JSON or, as Triton's clients send
it, in the binary tensor extension (`Inference-Header-Content-Length`; each element a
4-byte little-endian length and its bytes). The answer's outputs, as JSON: `probabilities`
(FP32 [N, labels]), `intent_id` (INT64 [N]) and `intent_name` (BYTES [N]). Errors are the
protocol's `{"error": "..."}` (the middleware renders every error on these routes so).
"""

from __future__ import annotations

import struct
from typing import Any

import orjson
from aiohttp import web

from batcher import __version__
from batcher.config import ServerSettings
from batcher.errors import NotReady, PayloadTooLarge, Unhealthy, ValidationFailed, snippet
from batcher.handlers import (
    DEADLINE,
    MODEL_VERSION,
    MODELS,
    PRIORITY,
    SETTINGS,
    STARTED,
    Item,
    check_sizes,
    door,
    encode,
    item,
    json_response,
    predict_rows,
    read_body,
)
from batcher.promises import promise_of

TEXT = "text"
HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUTS = (("probabilities", "FP32"), ("intent_id", "INT64"), ("intent_name", "BYTES"))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{name}", model_metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready)
    app.router.add_post("/v2/models/{name}/infer", infer)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": "batcher", "version": __version__, "extensions": ["binary_tensor_data"]})


async def live(request: web.Request) -> web.Response:
    if not request.app[MODELS].alive(request.app[SETTINGS].server.liveness_hang_s):
        raise Unhealthy()
    return json_response({"live": True})


async def ready(request: web.Request) -> web.Response:
    if not request.app[MODELS].ready:
        raise NotReady("not every model is loaded and ready")
    return json_response({"ready": True})


async def model_metadata(request: web.Request) -> web.Response:
    runtime = request.app[MODELS].get(request.match_info["name"])
    return json_response(
        {
            "name": runtime.name,
            "versions": [runtime.version],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": TEXT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(runtime.labels)]},
                {"name": "intent_id", "datatype": "INT64", "shape": [-1]},
                {"name": "intent_name", "datatype": "BYTES", "shape": [-1]},
            ],
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    models = request.app[MODELS]
    models.get(name)  # 404 for a model that is not configured
    if not models.model_ready(name):
        raise NotReady(f"model {snippet(name)} is not ready")
    return json_response({"name": name, "ready": True})


async def infer(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    priority, deadline = request.headers.get(PRIORITY), request.headers.get(DEADLINE)
    request.app[MODELS].get(name).batcher.check_admission(1, door(priority))  # 429 before any parsing
    raw = await read_body(request, request.app[SETTINGS].server)
    header, binary = _split(raw, request.headers.get(HEADER_LENGTH))
    texts, request_id = _texts(header, binary, limit=request.app[SETTINGS].server.max_batch_items)
    runtime = request.app[MODELS].get(name)  # after the last await before admission (handlers' docstring)
    server = request.app[SETTINGS].server
    items = [_item(text, index, server) for index, text in enumerate(texts)]
    rows = [row for body in items for row in encode(runtime, body)]
    predictions = await predict_rows(runtime, rows, promise_of(priority, deadline), request[STARTED])
    labels = runtime.labels
    answer: dict[str, Any] = {
        "model_name": runtime.name,
        "model_version": runtime.version,
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [len(predictions), len(labels)],
                "data": [float(p) for prediction in predictions for p in prediction.probabilities.tolist()],
            },
            {
                "name": "intent_id",
                "datatype": "INT64",
                "shape": [len(predictions)],
                "data": [p.intent_id for p in predictions],
            },
            {
                "name": "intent_name",
                "datatype": "BYTES",
                "shape": [len(predictions)],
                "data": [labels[p.intent_id] for p in predictions],
            },
        ],
    }
    if request_id is not None:
        answer["id"] = request_id
    return json_response(answer, headers={MODEL_VERSION: runtime.version})


def _split(raw: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """The JSON header and the binary tensor data after it (none without the header's length)."""
    length = len(raw)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise ValidationFailed(f"{HEADER_LENGTH}: {snippet(header_length)} is not a length within the body")
        length = int(header_length)
    try:
        return orjson.loads(raw[:length]), raw[length:]
    except orjson.JSONDecodeError as exc:
        raise ValidationFailed(f"the request's JSON header is not valid JSON: {str(exc)[:120]}") from None


def _texts(header: Any, binary: bytes, *, limit: int) -> tuple[list[str], str | None]:
    """The `text` input's elements and the request's id, with shape, type and size checked."""
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ValidationFailed("inputs: expected a list of input tensors")
    inputs = [tensor for tensor in header["inputs"] if isinstance(tensor, dict)]
    tensor = next((t for t in inputs if t.get("name") == TEXT), None)
    if tensor is None or len(inputs) != len(header["inputs"]) or len(inputs) != 1:
        raise ValidationFailed(f"inputs: expected exactly one input tensor, named {TEXT!r}")
    if tensor.get("datatype") != "BYTES":
        raise ValidationFailed(f"inputs.{TEXT}.datatype: expected BYTES")
    shape = tensor.get("shape")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d >= 0 for d in shape)):
        raise ValidationFailed(f"inputs.{TEXT}.shape: expected [N] or [N, 1]")
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise ValidationFailed(f"inputs.{TEXT}.shape: expected [N] or [N, 1], got {shape}")
    count = shape[0]
    if count == 0:
        raise ValidationFailed(f"inputs.{TEXT}.shape: at least one element")
    if count > limit:
        raise PayloadTooLarge(f"inputs.{TEXT}: {count} elements, more than max_batch_items ({limit})")
    size = (
        (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(tensor.get("parameters"), dict) else None
    )
    elements = _binary_elements(binary, size, count) if size is not None else _json_elements(tensor.get("data"), count)
    request_id = header.get("id")
    return elements, request_id if isinstance(request_id, str) else None


def _json_elements(data: Any, count: int) -> list[str]:
    if isinstance(data, list) and len(data) == count and all(isinstance(d, list) and len(d) == 1 for d in data):
        data = [d[0] for d in data]  # [[text], ...] for shape [N, 1]
    if not isinstance(data, list) or len(data) != count or not all(isinstance(item, str) for item in data):
        raise ValidationFailed(f"inputs.{TEXT}.data: expected {count} strings")
    return data


def _binary_elements(binary: bytes, size: Any, count: int) -> list[str]:
    """BYTES elements in the binary tensor extension: a little-endian uint32 length each."""
    if type(size) is not int or size != len(binary):
        raise ValidationFailed(f"inputs.{TEXT}.parameters.binary_data_size: expected {len(binary)}, the bytes sent")
    elements, offset = [], 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise ValidationFailed(f"inputs.{TEXT}: the binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", binary, offset)
        offset += 4
        if offset + length > len(binary):
            raise ValidationFailed(f"inputs.{TEXT}: an element is longer than the binary data left")
        try:
            elements.append(binary[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise ValidationFailed(f"inputs.{TEXT}: element {len(elements)} is not UTF-8") from None
        offset += length
    if len(elements) != count:
        raise ValidationFailed(f"inputs.{TEXT}: {len(elements)} elements in the data, the shape says {count}")
    return elements


def _item(text: str, index: int, server: ServerSettings) -> Item:
    """One element: {"turns": [...]} or {"text": ..., "text_pair": ...} as JSON, else a text."""
    data: Any = {"text": text}
    if text.lstrip().startswith("{"):
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict) and "turns" in parsed:
            data = {"turns": parsed["turns"]}
        elif isinstance(parsed, dict) and "text" in parsed:
            data = {key: parsed[key] for key in ("text", "text_pair") if key in parsed}
    try:
        check_sizes(data, server)
        return item(data)
    except (ValidationFailed, PayloadTooLarge) as error:
        raise type(error)(f"inputs.{TEXT}[{index}]: {error.message}") from None
