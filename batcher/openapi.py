"""The OpenAPI document, generated from the pydantic schemas and the configured limits
(what a request may carry, and every status it may get)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from batcher import schemas
from batcher.config import ServerSettings
from batcher.errors import (
    CORSForbidden,
    DeadlineExceeded,
    Draining,
    HTTPError,
    InvalidBody,
    InvalidJSON,
    MethodNotAllowed,
    ModelFailed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    QueueFull,
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
    ModelFailed,
    NotReady,
    Draining,
    DeadlineExceeded,
)
_COMMON_ERRORS: tuple[type[HTTPError], ...] = (NotFound, MethodNotAllowed)
_REQUEST_ID = {
    "name": "x-request-id",
    "in": "header",
    "required": False,
    "description": f"Echoed in the response when it matches `{schemas.REQUEST_ID_PATTERN}`; any other value is "
    "replaced, never refused: the response then carries a random 32-hex-digit id.",
    "schema": {"type": "string"},
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*errors: type[HTTPError]) -> dict[str, Any]:
    by_status: dict[str, list[str]] = {}
    for error in errors:
        by_status.setdefault(str(error.status), []).append(error.type)
    return {
        status: _json(schemas.ErrorResponse, "Error; `error.type` is one of: " + ", ".join(types))
        for status, types in by_status.items()
    }


def _operation(
    summary: str,
    response: type[BaseModel],
    *,
    body: type[BaseModel] | None = None,
    errors: tuple[type[HTTPError], ...] = (),
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": _json(response, "OK"), **_errors(*errors, *_COMMON_ERRORS)},
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
        operation["parameters"] = [_REQUEST_ID]
    return operation


def build_openapi(title: str, version: str, limits: ServerSettings) -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        schemas.PredictRequest,
        schemas.BatchPredictRequest,
        schemas.PredictResponse,
        schemas.BatchPredictResponse,
        schemas.IntentsResponse,
        schemas.ServiceStatus,
        schemas.Probe,
        schemas.ErrorResponse,
    ]
    _, definitions = models_json_schema(
        [(model, "validation" if model.__name__.endswith("Request") else "serialization") for model in models],
        ref_template=REF,
    )
    components = definitions.get("$defs", {})
    _limit(components, limits)
    predict_errors = _PREDICT_ERRORS
    paths = {
        "/": {"get": _operation("Service status", schemas.ServiceStatus)},
        "/healthz": {
            "get": _operation("Liveness: no model run hung, batcher running", schemas.Probe, errors=(Unhealthy,))
        },
        "/readyz": {"get": _operation("Readiness: loaded, warm, not draining", schemas.Probe, errors=(NotReady,))},
        "/intents": {"get": _operation("The intents the model predicts", schemas.IntentsResponse)},
        "/predict": {
            "post": _operation(
                "Predict the intent of one dialogue",
                schemas.PredictResponse,
                body=schemas.PredictRequest,
                errors=predict_errors,
            )
        },
        "/predict/batch": {
            "post": _operation(
                "Predict several dialogues; each is batched with other traffic",
                schemas.BatchPredictResponse,
                body=schemas.BatchPredictRequest,
                errors=predict_errors,
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components},
    }


def _limit(components: dict[str, Any], limits: ServerSettings) -> None:
    """The size limits the server checks (413 beyond them), published in the schemas."""
    components["BatchPredictRequest"]["properties"]["items"]["maxItems"] = limits.max_batch_items
    components["PredictRequest"]["properties"]["turns"]["maxItems"] = limits.max_turns
    components["Turn"]["properties"]["text"]["maxLength"] = limits.max_text_chars
