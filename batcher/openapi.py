"""The OpenAPI document, generated from the pydantic schemas and the configured limits
(what a request may carry, and every status it may get)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from batcher import schemas
from batcher.config import ServerSettings, Settings
from batcher.errors import (
    CORSForbidden,
    DeadlineExceeded,
    Draining,
    ExpectationFailed,
    HTTPError,
    InvalidBody,
    InvalidJSON,
    MethodNotAllowed,
    ModelFailed,
    ModelNotFound,
    NotFound,
    NotReady,
    PayloadTooLarge,
    PredictedLate,
    QueueFull,
    ReloadFailed,
    RequestTimeout,
    Unauthorized,
    Unhealthy,
    ValidationFailed,
)

REF = "#/components/schemas/{model}"
_PREDICT_ERRORS: tuple[type[HTTPError], ...] = (
    InvalidJSON,
    InvalidBody,
    Unauthorized,
    CORSForbidden,
    RequestTimeout,
    PayloadTooLarge,
    ValidationFailed,
    QueueFull,
    PredictedLate,
    ModelFailed,
    NotReady,
    Draining,
    DeadlineExceeded,
)
_COMMON_ERRORS: tuple[type[HTTPError], ...] = (NotFound, MethodNotAllowed, ExpectationFailed)
_REQUEST_ID = {
    "name": "x-request-id",
    "in": "header",
    "required": False,
    "description": f"Echoed in the response when it matches `{schemas.REQUEST_ID_PATTERN}`; any other value is "
    "replaced, never refused: the response then carries a random 32-hex-digit id.",
    "schema": {"type": "string"},
}
_PROMISES = (
    {
        "name": "x-priority",
        "in": "header",
        "required": False,
        "description": "high, normal (default) or low: higher goes first (none waits more than 1 s longer than "
        "without priorities); low is refused first at the door under overload. The body's `priority` wins.",
        "schema": {"type": "string", "enum": ["high", "normal", "low"]},
    },
    {
        "name": "x-deadline-ms",
        "in": "header",
        "required": False,
        "description": "The client's own deadline in ms from arrival (capped by batching.request_timeout_s). A "
        "request predicted to miss it is refused at once (429 predicted_late, with Retry-After and "
        "x-retry-after-ms); one never gets a late answer. The body's `deadline_ms` wins.",
        "schema": {"type": "number", "minimum": 100, "maximum": 3_600_000},
    },
)


Shapes = type[BaseModel] | tuple[type[BaseModel], ...]
"""One schema, or several a body may take (oneOf)."""


def _ref(model: Shapes) -> dict[str, Any]:
    if isinstance(model, tuple):
        return {"oneOf": [_ref(one) for one in model]}
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: Shapes, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*errors: type[HTTPError], shape: type[BaseModel] = schemas.ErrorResponse) -> dict[str, Any]:
    by_status: dict[str, list[str]] = {}
    for error in errors:
        # The Open Inference Protocol answers an invalid request 400, where ours say 422.
        status = "400" if shape is schemas.OIPError and error.status == 422 else str(error.status)
        by_status.setdefault(status, []).append(error.type)
    return {
        status: _json(shape, "Error; its type is one of: " + ", ".join(dict.fromkeys(types)))
        for status, types in by_status.items()
    }


def _operation(
    summary: str,
    response: Shapes,
    *,
    body: Shapes | None = None,
    errors: tuple[type[HTTPError], ...] = (),
    model: list[str] | None = None,
    shape: type[BaseModel] = schemas.ErrorResponse,
) -> dict[str, Any]:
    """One operation; `model`: the configured names its {name} path parameter takes."""
    if model is not None:
        errors = (*errors, ModelNotFound)
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": _json(response, "OK"), **_errors(*errors, *_COMMON_ERRORS, shape=shape)},
    }
    parameters = []
    if model is not None:
        parameters.append({"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": model}})
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
        parameters.append(_REQUEST_ID)
        if QueueFull in errors:  # the predict routes: what the batcher promises
            parameters.extend(_PROMISES)
    if parameters:
        operation["parameters"] = parameters
    return operation


def build_openapi(title: str, version: str, settings: Settings) -> dict[str, Any]:
    limits = settings.server
    names = [spec.name for spec in settings.served]
    models: list[type[BaseModel]] = [
        schemas.PredictRequest,
        schemas.TextRequest,
        schemas.InputsRequest,
        schemas.BatchPredictRequest,
        schemas.PredictResponse,
        schemas.ScoresResponse,
        schemas.BatchPredictResponse,
        schemas.IntentsResponse,
        schemas.ServiceStatus,
        schemas.Probe,
        schemas.ErrorResponse,
        schemas.ModelsResponse,
        schemas.ReloadResponse,
        schemas.InferRequest,
        schemas.InferResponse,
        schemas.OIPError,
        schemas.OIPServerMetadata,
        schemas.OIPLive,
        schemas.OIPReady,
        schemas.OIPModelReady,
        schemas.OIPModelMetadata,
    ]
    _, definitions = models_json_schema(
        [(model, "validation" if model.__name__.endswith("Request") else "serialization") for model in models],
        ref_template=REF,
    )
    components = definitions.get("$defs", {})
    _limit(components, limits)
    paths = {
        "/": {"get": _operation("Service status", schemas.ServiceStatus)},
        "/healthz": {
            "get": _operation("Liveness: no model run hung, batcher running", schemas.Probe, errors=(Unhealthy,))
        },
        "/readyz": {"get": _operation("Readiness: loaded, warm, not draining", schemas.Probe, errors=(NotReady,))},
        "/intents": {"get": _operation("The intents the model predicts", schemas.IntentsResponse)},
        **_predict_paths(
            "",
            None,
            "Predict the intent of one dialogue (turns), one text or pair (text, text_pair), or inputs "
            "(the text-embeddings-inference / Hugging Face shape, answered with every label's score)",
            "Predict several dialogues or texts; each is batched with other traffic",
        ),
        "/models": {"get": _operation("Every model served: name, version, labels, ready", schemas.ModelsResponse)},
        **_predict_paths(
            "/models/{name}", names, "Predict with the named model", "Predict several dialogues with the named model"
        ),
        "/models/{name}/intents": {
            "get": _operation("The named model's intents", schemas.IntentsResponse, errors=(NotReady,), model=names)
        },
        **_oip_paths(names),
    }
    if limits.admin_enabled:
        paths["/models/{name}/reload"] = {
            "post": _operation(
                "Re-read the named model's bundle from disk (server.admin_enabled)",
                schemas.ReloadResponse,
                errors=(Unauthorized, ReloadFailed),
                model=names,
            )
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }


def _predict_paths(prefix: str, model: list[str] | None, one: str, several: str) -> dict[str, Any]:
    """`{prefix}/predict` and `{prefix}/predict/batch`: the default model's (no prefix) or the named one's."""
    return {
        f"{prefix}/predict": {
            "post": _operation(
                one,
                (schemas.PredictResponse, schemas.ScoresResponse),
                body=(schemas.PredictRequest, schemas.TextRequest, schemas.InputsRequest),
                errors=_PREDICT_ERRORS,
                model=model,
            )
        },
        f"{prefix}/predict/batch": {
            "post": _operation(
                several,
                schemas.BatchPredictResponse,
                body=schemas.BatchPredictRequest,
                errors=_PREDICT_ERRORS,
                model=model,
            )
        },
    }


def _oip_paths(names: list[str]) -> dict[str, Any]:
    """The Open Inference Protocol (KServe v2) routes, in its error shape."""
    oip: dict[str, Any] = {"shape": schemas.OIPError}
    return {
        "/v2": {"get": _operation("Open Inference Protocol: server metadata", schemas.OIPServerMetadata, **oip)},
        "/v2/health/live": {"get": _operation("OIP liveness", schemas.OIPLive, errors=(Unhealthy,), **oip)},
        "/v2/health/ready": {"get": _operation("OIP readiness", schemas.OIPReady, errors=(NotReady,), **oip)},
        "/v2/models/{name}": {"get": _operation("OIP model metadata", schemas.OIPModelMetadata, model=names, **oip)},
        "/v2/models/{name}/ready": {
            "get": _operation("OIP model readiness", schemas.OIPModelReady, errors=(NotReady,), model=names, **oip)
        },
        "/v2/models/{name}/infer": {
            "post": _operation(
                "OIP inference: input `text` (BYTES, [N] or [N, 1]); outputs probabilities, intent_id, intent_name",
                schemas.InferResponse,
                body=schemas.InferRequest,
                errors=_PREDICT_ERRORS,
                model=names,
                **oip,
            )
        },
    }


def _limit(components: dict[str, Any], limits: ServerSettings) -> None:
    """The size limits the server checks (413 beyond them), published in the schemas."""
    components["BatchPredictRequest"]["properties"]["items"]["maxItems"] = limits.max_batch_items
    components["PredictRequest"]["properties"]["turns"]["maxItems"] = limits.max_turns
    components["Turn"]["properties"]["text"]["maxLength"] = limits.max_text_chars
    for key in ("text", "text_pair"):
        _text_schema(components["TextRequest"]["properties"][key])["maxLength"] = limits.max_text_chars


def _text_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The string branch of a field's schema (`anyOf` string/null for an optional one)."""
    for option in schema.get("anyOf", []):
        if option.get("type") == "string":
            found: dict[str, Any] = option  # edited in place
            return found
    return schema
