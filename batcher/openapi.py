"""The OpenAPI document, generated from the pydantic schemas, and the Swagger UI page
(served from the assets the `swagger-ui-bundle` package ships; no CDN)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from batcher import schemas
from batcher.errors import (
    DeadlineExceeded,
    HTTPError,
    InvalidJSON,
    MethodNotAllowed,
    ModelFailed,
    NotFound,
    NotReady,
    PayloadTooLarge,
    QueueFull,
    RequestTimeout,
    Unauthorized,
    ValidationFailed,
)

REF = "#/components/schemas/{model}"
_PREDICT_ERRORS: tuple[type[HTTPError], ...] = (
    Unauthorized,
    RequestTimeout,
    InvalidJSON,
    PayloadTooLarge,
    ValidationFailed,
    QueueFull,
    ModelFailed,
    NotReady,
    DeadlineExceeded,
)
_COMMON_ERRORS: tuple[type[HTTPError], ...] = (NotFound, MethodNotAllowed)


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
    return operation


def build_openapi(title: str, version: str) -> dict[str, Any]:
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
    predict_errors = _PREDICT_ERRORS
    paths = {
        "/": {"get": _operation("Service status", schemas.ServiceStatus)},
        "/healthz": {"get": _operation("Liveness: the process answers", schemas.Probe)},
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
        "components": {"schemas": definitions.get("$defs", {})},
    }


SWAGGER_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>batcher API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
"""
