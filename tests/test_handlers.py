"""Handlers against a real aiohttp server on loopback with the tiny real ONNX model.
Tests about queue timing (429, the 504 deadline) use FakeModel and say so; model faults and
hangs are injected around the real model (FaultInjector)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from batcher.config import ModelSettings
from batcher.handlers import MODELS
from batcher.metrics import Metrics
from batcher.model.bundle import load_bundle
from batcher.model.formats import TextEncoder
from batcher.model.session import OnnxModel
from batcher.schemas import BatchPredictResponse, ErrorResponse, PredictResponse
from tests.conftest import FakeModel, FaultInjector, MakeClient, eventually, metric
from tests.tiny_model import LABELS

ONE = {"turns": [{"speaker": "user", "text": "我们有空一起去看风景好不好"}]}


def turns(*texts: str) -> dict[str, Any]:
    return {"turns": [{"speaker": "user" if i % 2 == 0 else "assistant", "text": t} for i, t in enumerate(texts)]}


async def expect_error(response: Any, status: int, kind: str, field: str | None = None) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    ErrorResponse.model_validate(body)
    assert body["error"]["type"] == kind
    if field is not None:
        assert field in body["error"]["message"]
    return body  # type: ignore[no-any-return]


def direct_prediction(bundle: Path, payload: dict[str, Any]) -> np.ndarray:
    """The tiny model run alone, in-process, on the same text: the reference for batched results."""
    encoder = TextEncoder.from_bundle(bundle, 128)
    ids = np.array([encoder.encode_dialogue((t.get("speaker", "user"), t["text"]) for t in payload["turns"]).ids])
    logits = OnnxModel(load_bundle(bundle), ModelSettings(intra_op_threads=1)).run(
        ids, np.ones_like(ids), np.zeros_like(ids)
    )[0]
    probs: np.ndarray = np.exp(logits) / np.exp(logits).sum()
    return probs


async def test_status_probes_and_intents(make_client: MakeClient) -> None:
    client = await make_client()
    index = await (await client.get("/")).json()
    assert index["status"] == "ok" and index["model_loaded"] is True and index["ready"] is True
    assert index["provider"] == "CPUExecutionProvider"
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    intents = await (await client.get("/intents")).json()
    assert intents == {"intents": [{"id": i, "name": n} for i, n in enumerate(LABELS)]}


async def test_predict_matches_the_model_run_alone(make_client: MakeClient, tiny_bundle: Path) -> None:
    client = await make_client()
    response = await client.post("/predict", json={**ONE, "return_all_probs": True})
    assert response.status == 200
    body = await response.json()
    PredictResponse.model_validate(body)
    expected = direct_prediction(tiny_bundle, ONE)
    assert body["intent_id"] == int(expected.argmax())
    assert body["intent_name"] == LABELS[body["intent_id"]]
    assert body["confidence"] == pytest.approx(float(expected.max()), abs=1e-4)
    assert list(body["probabilities"]) == LABELS
    assert sum(body["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    assert body["timing"]["batch_size"] >= 1
    assert body["timing"]["total_ms"] >= body["timing"]["inference_ms"] > 0
    assert body["inference_time_ms"] == pytest.approx(body["timing"]["inference_ms"], abs=0.01)
    assert int(response.headers["x-batch-size"]) == body["timing"]["batch_size"]
    assert float(response.headers["x-inference-time-ms"]) > 0
    assert float(response.headers["x-queue-time-ms"]) >= 0
    assert len(response.headers["x-request-id"]) == 32
    second = await client.post("/predict", json=ONE)
    assert second.headers["x-request-id"] != response.headers["x-request-id"]


async def test_probabilities_only_when_asked(make_client: MakeClient) -> None:
    client = await make_client()
    body = await (await client.post("/predict", json=ONE)).json()
    assert "probabilities" not in body
    assert set(body) == {"intent_id", "intent_name", "confidence", "inference_time_ms", "timing"}


async def test_request_id_is_echoed(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/predict", json=ONE, headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    bad = await client.post("/predict", json=ONE, headers={"x-request-id": "x" * 500})
    assert bad.headers["x-request-id"] != "x" * 500


@pytest.mark.parametrize("tokenize_on", ["auto", "loop", "worker"])
async def test_concurrent_mixed_lengths_batch_and_match_alone(
    make_client: MakeClient, tiny_bundle: Path, tokenize_on: str
) -> None:
    """Tokenized on the loop or with their batch on the worker, the same answers."""
    metrics = Metrics(process=False)
    client = await make_client(f'batching.tokenize_on="{tokenize_on}"', metrics=metrics)
    payloads = [turns("播放周杰伦的歌"), turns("今天天气怎么样", "晴", "那明天呢" * 5), ONE, turns("hello world")]
    expected = [direct_prediction(tiny_bundle, p) for p in payloads]
    requests = [client.post("/predict", json={**p, "return_all_probs": True}) for p in payloads * 25]
    responses = await asyncio.gather(*requests)
    bodies = [await r.json() for r in responses]
    for index, body in enumerate(bodies):
        probs = np.array(list(body["probabilities"].values()))
        np.testing.assert_allclose(probs, expected[index % 4], atol=2e-4)
    assert max(b["timing"]["batch_size"] for b in bodies) > 1
    tokenized = metric(metrics, "batcher_tokenize_duration_seconds_count")
    assert tokenized == (100 if tokenize_on != "worker" else metric(metrics, "batcher_batch_size_count"))


async def test_300_concurrent_requests_all_answered_in_batches(make_client: MakeClient) -> None:
    metrics = Metrics(process=False)
    client = await make_client(metrics=metrics)
    responses = await asyncio.gather(*(client.post("/predict", json=ONE) for _ in range(300)))
    assert [r.status for r in responses] == [200] * 300
    count = metric(metrics, "batcher_batch_size_count")
    total = metric(metrics, "batcher_batch_size_sum")
    assert total == 300
    assert count is not None and total / count > 1
    assert metric(metrics, "batcher_requests_total", route="/predict", status="200") == 300


async def test_batch_endpoint_keeps_order(make_client: MakeClient, tiny_bundle: Path) -> None:
    client = await make_client()
    items = [turns("播放周杰伦的歌"), {**ONE, "return_all_probs": True}, turns("hello")]
    response = await client.post("/predict/batch", json={"items": items})
    assert response.status == 200
    body = await response.json()
    BatchPredictResponse.model_validate(body)
    assert len(body["results"]) == 3
    for item, result in zip(items, body["results"], strict=True):
        assert result["intent_id"] == int(direct_prediction(tiny_bundle, item).argmax())
    assert "probabilities" in body["results"][1] and "probabilities" not in body["results"][0]


@pytest.mark.parametrize(
    ("body", "status", "kind", "field"),
    [
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        (b"", 400, "invalid_json", "not valid JSON"),
        (b"\xff\xfe{}", 400, "invalid_json", "not valid JSON"),
        (b"[1, 2]", 422, "validation_error", "body"),
        (b'"text"', 422, "validation_error", "body"),
        (b"{}", 422, "validation_error", "turns"),
        (b'{"turns": []}', 422, "validation_error", "turns"),
        (b'{"turns": "hello"}', 422, "validation_error", "turns"),
        (b'{"turns": [{"speaker": "user"}]}', 422, "validation_error", "turns.0.text"),
        (b'{"turns": [{"speaker": "user", "text": 5}]}', 422, "validation_error", "turns.0.text"),
        (b'{"turns": [{"speaker": "", "text": "hi"}]}', 422, "validation_error", "turns.0.speaker"),
        (b'{"turns": [{"speaker": "user", "text": "  \\n "}]}', 422, "validation_error", "no turn has non-blank text"),
        (b'{"turns": [{"text": "hi"}], "return_all_probs": "yes"}', 422, "validation_error", "return_all_probs"),
        (b'{"turns": [{"text": "hi"}], "return_all_probs": 1}', 422, "validation_error", "return_all_probs"),
        (b"[" * 5000 + b"]" * 5000, 400, "invalid_json", "not valid JSON"),
    ],
)
async def test_bad_predict_bodies(make_client: MakeClient, body: bytes, status: int, kind: str, field: str) -> None:
    client = await make_client()
    response = await client.post("/predict", data=body, headers={"Content-Type": "application/json"})
    await expect_error(response, status, kind, field)


@pytest.mark.parametrize(
    ("body", "status", "kind", "field"),
    [
        ({"items": []}, 422, "validation_error", "items"),
        ({"items": [{"turns": []}]}, 422, "validation_error", "items.0.turns"),
        ({"items": [ONE] * 5}, 413, "payload_too_large", "max_batch_items (4)"),
    ],
)
async def test_bad_batch_bodies(make_client: MakeClient, body: Any, status: int, kind: str, field: str) -> None:
    client = await make_client("server.max_batch_items=4")
    await expect_error(await client.post("/predict/batch", json=body), status, kind, field)


async def test_oversized_body_is_413_and_server_keeps_serving(make_client: MakeClient) -> None:
    client = await make_client("server.client_max_size_bytes=2048")
    big = {"turns": [{"speaker": "user", "text": "好" * 5000}]}
    await expect_error(await client.post("/predict", json=big), 413, "payload_too_large")

    async def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b"x" * 1024

    await expect_error(await client.post("/predict", data=chunks()), 413, "payload_too_large")
    assert (await client.post("/predict", json=ONE)).status == 200


async def test_long_dialogue_is_truncated_not_rejected(make_client: MakeClient) -> None:
    client = await make_client()
    long_turns = [{"speaker": "user", "text": "风景" * 2000}] * 10 + [{"speaker": "user", "text": "播放周杰伦的歌"}]
    response = await client.post("/predict", json={"turns": long_turns})
    assert response.status == 200


async def test_unknown_routes_and_methods_are_json(make_client: MakeClient) -> None:
    client = await make_client()
    await expect_error(await client.get("/nope"), 404, "not_found", "/nope")
    response = await client.get("/predict")
    await expect_error(response, 405, "method_not_allowed", "GET")
    assert "POST" in response.headers["Allow"]


async def test_queue_full_is_429_with_retry_after(make_client: MakeClient) -> None:
    # FakeModel: the point is queue timing, the model is held on a gate.
    model = FakeModel()
    client = await make_client(
        "batching.max_batch_size=1",
        "batching.max_queue_size=2",
        "batching.max_wait_s=0",
        "batching.instances=1",
        model=model,
    )
    model.armed = True
    model.gate.clear()
    batcher = client.app[MODELS].get().batcher
    admitted = [asyncio.ensure_future(client.post("/predict", json=ONE))]
    await model.started()  # one running
    admitted.append(asyncio.ensure_future(client.post("/predict", json=ONE)))
    await eventually(lambda: batcher.unanswered == 2)  # one staged behind it
    for _ in range(2):  # two queued: max_queue_size
        admitted.append(asyncio.ensure_future(client.post("/predict", json=ONE)))
    await eventually(lambda: batcher.unanswered == 4)
    response = await client.post("/predict", json=ONE)
    await expect_error(response, 429, "queue_full")
    assert response.headers["Retry-After"] == "1"
    model.gate.set()
    assert [r.status for r in await asyncio.gather(*admitted)] == [200] * 4


async def test_deadline_is_504(make_client: MakeClient) -> None:
    # FakeModel: the point is the deadline, the model is held on a gate.
    model = FakeModel()
    client = await make_client("batching.request_timeout_s=0.15", "batching.max_batch_size=1", model=model)
    model.armed = True
    model.gate.clear()
    response = await client.post("/predict", json=ONE)
    await expect_error(response, 504, "deadline_exceeded")
    model.gate.set()


async def test_model_fault_fails_only_its_batch_then_recovers(
    make_client: MakeClient, real_model: FaultInjector, tiny_bundle: Path
) -> None:
    client = await make_client("batching.instances=1", "batching.max_batch_size=4", model=real_model)
    real_model.running.clear()
    real_model.stepping = True
    real_model.fail_next = 1
    first = asyncio.ensure_future(client.post("/predict", json=ONE))
    assert await asyncio.get_running_loop().run_in_executor(None, real_model.running.wait, 5)
    texts = ["播放周杰伦的歌", "明天北京天气怎么样", "把客厅的灯关掉"]
    later = [asyncio.ensure_future(client.post("/predict", json=turns(text))) for text in texts]
    batcher = client.app[MODELS].get().batcher
    await eventually(lambda: batcher.unanswered == 4)  # queued behind the held run
    real_model.steps.release()  # the first run goes on, and fails
    await expect_error(await first, 500, "model_error")
    assert (await client.get("/readyz")).status == 503  # the last run failed
    real_model.steps.release()  # the next batch runs
    for text, response in zip(texts, await asyncio.gather(*later), strict=True):
        assert response.status == 200
        body = await response.json()
        assert body["intent_id"] == int(direct_prediction(tiny_bundle, turns(text)).argmax())
        assert body["timing"]["batch_size"] == 3
    assert real_model.runs[-2:] == [(1, True), (3, False)]
    assert (await client.get("/readyz")).status == 200


async def test_draining_answers_503(make_client: MakeClient) -> None:
    client = await make_client()
    client.app[MODELS].begin_drain()
    await expect_error(await client.post("/predict", json=ONE), 503, "shutting_down")
    await expect_error(await client.get("/readyz"), 503, "not_ready")
    assert (await client.get("/healthz")).status == 200


async def test_openapi_and_docs(make_client: MakeClient) -> None:
    client = await make_client()
    spec = await (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    predict = spec["paths"]["/predict"]["post"]
    shapes = predict["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert [shape["$ref"].rsplit("/", 1)[1] for shape in shapes] == ["PredictRequest", "TextRequest", "InputsRequest"]
    answers = predict["responses"]["200"]["content"]["application/json"]["schema"]["oneOf"]
    assert [shape["$ref"].rsplit("/", 1)[1] for shape in answers] == ["PredictResponse", "ScoresResponse"]
    assert {"200", "400", "413", "422", "429", "500", "503", "504"} <= set(predict["responses"])
    assert "turns" in spec["components"]["schemas"]["PredictRequest"]["properties"]
    page = await client.get("/docs")
    assert page.status == 200 and "swagger-ui-bundle.js" in await page.text()
    asset = await client.get("/docs/static/swagger-ui-bundle.js")
    assert asset.status == 200 and len(await asset.read()) > 100_000


async def test_metrics_exposes_every_family(make_client: MakeClient) -> None:
    client = await make_client(metrics=Metrics())
    await client.post("/predict", json=ONE)
    await client.post("/predict", data=b"{")
    text = await (await client.get("/metrics")).text()
    for family in (
        "batcher_requests_total",
        "batcher_request_duration_seconds_bucket",
        "batcher_queue_wait_seconds_bucket",
        "batcher_inference_duration_seconds_bucket",
        "batcher_tokenize_duration_seconds_bucket",
        "batcher_batch_size_bucket",
        "batcher_batch_padding_ratio_bucket",
        "batcher_queue_depth",
        "batcher_inflight_batches",
        "batcher_rejected_total",
        "batcher_model_info",
        "process_resident_memory_bytes",
    ):
        assert family in text, family
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("batcher_rejected_total", (("model", "intent-zh"), ("reason", "invalid")))] == 1
    assert samples[("batcher_requests_total", (("model", "intent-zh"), ("route", "/predict"), ("status", "400")))] == 1
    assert 'provider="CPUExecutionProvider"' in text


async def test_bearer_token_auth(make_client: MakeClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one token a line\nsecret-one\n")
    monkeypatch.setenv("TEST_TOKENS", "secret-two, secret-three")
    client = await make_client(f'server.auth_tokens_file="{tokens}"', 'server.auth_tokens_env="TEST_TOKENS"')
    response = await client.post("/predict", json=ONE)
    await expect_error(response, 401, "unauthorized", "Bearer")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer wrong", "Basic secret-one", "secret-one", "Bearer "):
        await expect_error(
            await client.post("/predict", json=ONE, headers={"Authorization": header}), 401, "unauthorized"
        )
    for token in ("secret-one", "secret-three"):
        ok = await client.post("/predict", json=ONE, headers={"Authorization": f"Bearer {token}"})
        assert ok.status == 200
    batch = await client.post("/predict/batch", json={"items": [ONE]})
    await expect_error(batch, 401, "unauthorized")
    assert (await client.get("/healthz")).status == 200  # probes stay open


async def test_slow_body_gets_408(make_client: MakeClient) -> None:
    client = await make_client("server.body_read_timeout_s=0.2")

    async def slow() -> Any:
        yield b'{"turns": [{"text": '
        await asyncio.sleep(1.0)
        yield b'"hi"}]}'

    await expect_error(await client.post("/predict", data=slow()), 408, "request_timeout", "0.2 s")
    assert (await client.post("/predict", json=ONE)).status == 200


async def test_metrics_and_docs_can_be_turned_off(make_client: MakeClient) -> None:
    client = await make_client("server.expose_metrics=false", "server.expose_docs=false")
    for path in ("/metrics", "/docs", "/openapi.json", "/docs/static/swagger-ui.css"):
        await expect_error(await client.get(path), 404, "not_found")
    assert (await client.post("/predict", json=ONE)).status == 200


async def test_cors_is_off_unless_configured(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/predict", json=ONE)  # curl: no Origin
    assert response.status == 200 and not any(h.startswith("Access-Control") for h in response.headers)
    own = f"http://127.0.0.1:{client.server.port}"  # the page at /docs, "try it out"
    assert (await client.post("/predict", json=ONE, headers={"Origin": own})).status == 200
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    await expect_error(await client.options("/predict", headers=preflight), 405, "method_not_allowed")


async def test_cors_answers_preflights_for_allowed_origins_only(make_client: MakeClient) -> None:
    client = await make_client('server.cors_allow_origins="https://app.example"', "server.cors_max_age_s=120")
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    response = await client.options("/predict", headers=preflight)
    assert response.status == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert response.headers["Access-Control-Allow-Methods"] == "POST"
    assert response.headers["Access-Control-Max-Age"] == "120"
    assert {"CONTENT-TYPE", "AUTHORIZATION"} <= set(response.headers["Access-Control-Allow-Headers"].split(","))
    answer = await client.post("/predict", json=ONE, headers={"Origin": "https://app.example"})
    assert answer.status == 200 and answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "x-request-id" in answer.headers["Access-Control-Expose-Headers"].split(",")
    # Another origin: its preflight is refused in our error shape, and no CORS headers on answers.
    await expect_error(
        await client.options("/predict", headers={**preflight, "Origin": "https://evil.example"}), 403, "cors_forbidden"
    )
    other = await client.post("/predict", json=ONE, headers={"Origin": "https://evil.example"})
    await expect_error(other, 403, "cors_forbidden", "https://evil.example")
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1"])
@pytest.mark.parametrize("route", ["/predict", "/predict/batch"])
async def test_a_simple_cross_origin_post_is_refused_when_cors_is_off(
    make_client: MakeClient, origin: str, route: str
) -> None:
    """Browsers send a text/plain POST from any page without a preflight: refusing the
    preflight alone let such pages make the server compute."""
    metrics = Metrics(process=False)
    client = await make_client(metrics=metrics)
    body = json.dumps({"items": [ONE]} if route.endswith("batch") else ONE)
    response = await client.post(route, data=body, headers={"Content-Type": "text/plain", "Origin": origin})
    await expect_error(response, 403, "cors_forbidden")
    assert metric(metrics, "batcher_batch_size_count") == 0  # nothing was computed


async def raw_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; the answer's status, headers and body, once the server has closed the
    connection (a server that keeps it open fails the test by timing out)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(2):
            answer = await reader.read()  # to EOF
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (field.partition(":") for field in fields)}
    return int(status_line.split()[1]), headers, body


LONG_FIELD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\nConnection: close\r\n\r\n"
MANY_FIELDS = (
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    + b"".join(b"X-%d: v\r\n" % index for index in range(200))
    + b"Connection: close\r\n\r\n"
)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [((), 400), (("server.max_header_bytes=16384", "server.max_header_count=300"), 200)],
)
async def test_oversized_headers_are_400_and_closed_unless_allowed(
    make_client: MakeClient, overrides: tuple[str, ...], expected: int
) -> None:
    client = await make_client(*overrides)
    port = client.server.port
    assert port is not None
    for request in (LONG_FIELD, MANY_FIELDS):
        assert (await raw_exchange(port, request))[0] == expected
    assert (await client.post("/predict", json=ONE)).status == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        LONG_FIELD,
        MANY_FIELDS,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Bad: " + b"\x01" * 5000 + b"\r\n\r\n",  # control bytes
        b"\x16\x03\x01" + b"\x00" * 300 + b"\r\n\r\n",  # TLS to a plain-HTTP port
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    ],
    ids=["long_header", "many_headers", "control_bytes", "tls_hello", "bad_content_length", "long_request_line"],
)
async def test_malformed_http_gets_a_short_json_400_and_the_connection_closed(
    make_client: MakeClient, request_bytes: bytes
) -> None:
    """aiohttp answers these before any route or middleware; its own page echoed the whole
    offending line (up to the header limit) as plain text."""
    client = await make_client()
    port = client.server.port
    assert port is not None
    status, headers, body = await raw_exchange(port, request_bytes)  # returns once the server closed it
    assert status == 400 and headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["type"] == "malformed_http" and error["message"].startswith("malformed HTTP request")
    assert len(error["message"]) <= 120 and "aaaa" not in error["message"]  # a short reason, never the input
    assert (await client.post("/predict", json=ONE)).status == 200


async def test_hung_model_answers_504_and_reports_not_ready(make_client: MakeClient, real_model: FaultInjector) -> None:
    client = await make_client("batching.request_timeout_s=0.2", model=real_model)
    real_model.hold.clear()  # the run hangs; the watchdog is the request deadline
    await expect_error(await client.post("/predict", json=ONE), 504, "deadline_exceeded")
    batcher = client.app[MODELS].get().batcher
    await eventually(lambda: batcher.stalled)  # the held run is now older than the deadline
    await expect_error(await client.get("/readyz"), 503, "not_ready")
    real_model.hold.set()
    await eventually(lambda: batcher.unanswered == 0)  # the held run came back
    assert (await client.get("/readyz")).status == 200
    assert (await client.post("/predict", json=ONE)).status == 200


async def test_hostile_bodies_get_fast_clear_answers(make_client: MakeClient) -> None:
    client = await make_client()
    nul = {"turns": [{"speaker": "user", "text": "播放\u0000周杰伦\u0000的歌"}]}
    assert (await client.post("/predict", json=nul)).status == 200
    many = {"turns": [{"speaker": "user", "text": "好"}] * 5_000}
    await expect_error(await client.post("/predict", json=many), 413, "payload_too_large", "max_turns (256)")
    huge = b'{"turns": [{"text": "' + b"x" * (10 * 1024 * 1024) + b'"}]}'
    await expect_error(await client.post("/predict", data=io.BytesIO(huge)), 413, "payload_too_large")
    long_speaker = {"turns": [{"speaker": "u" * 1000, "text": "hi"}]}
    body = await expect_error(await client.post("/predict", json=long_speaker), 422, "validation_error")
    assert "u" * 100 not in body["error"]["message"]  # never echoes the input back at length
    assert (await client.post("/predict", json=ONE)).status == 200
