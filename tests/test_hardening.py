"""Regression tests for the line-by-line audit of the server (issue "Hardening"): each
confirmed finding, and each suspected one shown fixed or sound. Real aiohttp server on
loopback with the tiny real model; FakeModel only where the point is timing or a fault."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers

from batcher.application import drain
from batcher.errors import DeadlineExceeded, ValidationFailed, loggable
from batcher.handlers import MODELS
from batcher.metrics import Metrics
from batcher.model.formats import InputFormat, TextEncoder
from batcher.model.tokenization import Tokens, special_tokens
from tests.conftest import FakeModel, FaultInjector, MakeBatcher, MakeClient, eventually, metric, row
from tests.processes import finish, start, wait_ready

ONE = {"turns": [{"speaker": "user", "text": "我们有空一起去看风景好不好"}]}


async def error_of(response: Any, status: int) -> dict[str, str]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    return (await response.json())["error"]  # type: ignore[no-any-return]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.exc_info or record.exc_text]


# Confirmed findings -----------------------------------------------------------


async def test_1_a_drain_past_its_timeout_answers_503_to_what_is_left(
    make_client: MakeClient, real_model: FaultInjector
) -> None:
    client = await make_client(
        "server.shutdown_timeout_s=0.3", "batching.instances=1", "batching.max_batch_size=1", model=real_model
    )
    real_model.hold.clear()  # the run in progress hangs
    running = asyncio.ensure_future(client.post("/predict", json=ONE))
    batcher = client.app[MODELS].get().batcher
    await eventually(lambda: batcher.longest_run_s > 0)
    queued = asyncio.ensure_future(client.post("/predict", json=ONE))
    await eventually(lambda: batcher.unanswered == 2)
    started = time.monotonic()
    await drain(client.app)
    assert time.monotonic() - started < 1.5  # bounded by shutdown_timeout_s, not by the hung run
    for response in await asyncio.gather(running, queued):
        assert (await error_of(response, 503))["type"] == "shutting_down"
    real_model.hold.set()


async def test_1_a_drain_does_not_wait_for_company(make_client: MakeClient) -> None:
    client = await make_client("batching.max_wait_s=10", "batching.max_batch_size=2")
    await asyncio.gather(*(client.post("/predict", json=ONE) for _ in range(2)))  # company is expected now
    waiting = asyncio.ensure_future(client.post("/predict", json=ONE))
    batcher = client.app[MODELS].get().batcher
    await eventually(lambda: batcher.unanswered == 1)
    started = time.monotonic()
    await drain(client.app)
    assert (await waiting).status == 200
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", b'{"turns": [{"text": "hi"}]}'),
        ("deflate", b'{"turns": [{"text": "hi"}]}'),
        ("gzip", zlib.compress(b'{"turns": [{"text": "hi"}]}')[:-4]),  # truncated deflate stream
    ],
)
async def test_2_a_body_whose_content_encoding_lies_is_400_without_tracebacks(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture, encoding: str, body: bytes
) -> None:
    client = await make_client()
    headers = {"Content-Encoding": encoding, "Content-Type": "application/json"}
    response = await client.post("/predict", data=body, headers=headers)
    assert (await error_of(response, 400))["type"] == "invalid_body"
    assert response.headers.get("Connection", "").lower() == "close"
    assert (await client.post("/predict", json=ONE)).status == 200
    assert not tracebacks(caplog)


async def test_2_a_truthful_content_encoding_is_read(make_client: MakeClient) -> None:
    client = await make_client()
    body = zlib.compress(json.dumps(ONE).encode())
    response = await client.post("/predict", data=body, headers={"Content-Encoding": "deflate"})
    assert response.status == 200


async def test_3_a_long_forged_docs_path_is_404_and_logs_nothing_forged(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = await make_client()
    response = await client.get("/docs/static/" + "A" * 300 + "%0a2026-12-01 ERROR forged: record")
    assert (await error_of(response, 404))["type"] == "not_found"
    assert not any("\n" in record.getMessage() for record in caplog.records)
    assert not tracebacks(caplog)


def test_3_client_text_is_escaped_for_the_log() -> None:
    assert loggable("/a\n2026 ERROR forged\x1b[31m") == "/a\\n2026 ERROR forged\\x1b[31m"
    assert loggable("播放音乐") == "播放音乐"
    assert loggable("x" * 300, 10) == "x" * 10 + "…"


@pytest.mark.parametrize("header", ["Bearer \udcff", "Bearer caf\u00e9", "\udcff\udcfe"])
async def test_4_a_non_ascii_authorization_header_is_401(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch, header: str
) -> None:
    monkeypatch.setenv("TEST_TOKENS", "secret")
    client = await make_client('server.auth_tokens_env="TEST_TOKENS"')
    raw = header.encode("utf-8", "surrogateescape")  # the bytes on the wire, \xff included
    request = (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
        + raw
        + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


@pytest.fixture(scope="module")
def live_server(tiny_bundle: Path) -> Iterator[str]:
    """app.py as a process: its own event loop and the garbage-collector settings it runs with."""
    process, url = start(tiny_bundle)
    wait_ready(process, url)
    yield url
    process.send_signal(signal.SIGTERM)
    code, output = finish(process, 20)
    assert code == 0 and "Traceback" not in output


async def post_raw(url: str, path: str, body: bytes) -> tuple[int, dict[str, str]]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])["error"]


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/predict/batch", {"items": [{"turns": [{"text": "a"}]}] * 10_000}, "max_batch_items (64)"),
        ("/predict/batch", {"items": [ONE] * 64 + [{"turns": []}]}, "max_batch_items (64)"),
        ("/predict", {"turns": [{"text": "a"}] * 20_000}, "max_turns (256)"),
        ("/predict", {"turns": [{"text": "好" * 80_000}]}, "max_text_chars (10000)"),
    ],
    ids=["10k_items", "65_items_one_invalid", "20k_turns", "long_text"],
)
async def test_5_a_legal_but_huge_body_is_refused_for_size_without_stalling_the_loop(
    live_server: str, route: str, body: dict[str, Any], message: str
) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    assert len(data) <= 256 * 1024  # legal by the body limit (server.client_max_size_bytes)
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def probe() -> None:
            while True:
                started = time.perf_counter()
                async with session.get(f"{live_server}/healthz") as response:
                    assert response.status == 200
                latencies.append(time.perf_counter() - started)
                await asyncio.sleep(0.002)

        prober = asyncio.ensure_future(probe())
        await asyncio.sleep(0.05)
        answers = [await post_raw(live_server, route, data) for _ in range(3)]
        await asyncio.sleep(0.05)
        prober.cancel()
    for status, error in answers:
        assert status == 413 and error["type"] == "payload_too_large" and message in error["message"]
    assert max(latencies) < 0.060, f"/healthz waited {max(latencies) * 1000:.0f} ms"


async def test_7_blank_means_one_thing_everywhere(make_client: MakeClient) -> None:
    client = await make_client()
    for text in ("\u001c\u001d", "\u0085", "\u200b\u200d", "\x1f", "\ufeff\u3000"):
        response = await client.post("/predict", json={"turns": [{"text": text}]})
        assert (await error_of(response, 422))["type"] == "validation_error", repr(text)


async def test_8_the_docs_static_folder_itself_is_404(make_client: MakeClient) -> None:
    client = await make_client()
    for path in ("/docs/static/", "/docs/static/index.html", "/docs/static/..%2f..%2fapp.py"):
        assert (await error_of(await client.get(path), 404))["type"] == "not_found", path


async def test_9_generated_request_ids_are_random(make_client: MakeClient) -> None:
    client = await make_client()
    ids = [int((await client.get("/healthz")).headers["x-request-id"], 16) for _ in range(5)]
    assert len(set(ids)) == 5
    assert all(abs(a - b) > 2**64 for a, b in itertools.pairwise(ids))  # not a counter


@pytest.mark.parametrize("path", ["/predict", "/nope"])
async def test_an_expect_header_other_than_100_continue_is_417_in_the_error_shape(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """Found by the HTTP-layer fuzzer: aiohttp's own handler answered in plain text, and with
    a 500 and a traceback when the value was not ASCII."""
    client = await make_client()
    for value in (b"200-ok", b"\xa06)]"):
        request = b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nExpect: " + value + b"\r\n"
        request += b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
        writer.write(request)
        answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 417"), answer[:200]
        assert json.loads(body)["error"]["type"] == "expectation_failed"
    assert not tracebacks(caplog)


async def test_expect_100_continue_still_works(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/predict", json=ONE, headers={"Expect": "100-continue"})
    assert response.status == 200


# Suspected findings -----------------------------------------------------------


async def test_the_ready_gauge_follows_readiness_at_every_scrape(
    make_client: MakeClient, real_model: FaultInjector
) -> None:
    metrics = Metrics(process=False)
    client = await make_client("batching.request_timeout_s=0.2", model=real_model, metrics=metrics)
    assert metric(metrics, "batcher_ready") == 1
    real_model.hold.clear()  # a run hangs past the deadline: not ready
    await error_of(await client.post("/predict", json=ONE), 504)
    batcher = client.app[MODELS].get().batcher
    await eventually(lambda: batcher.stalled)
    assert metric(metrics, "batcher_ready") == 0
    real_model.hold.set()
    await eventually(lambda: batcher.unanswered == 0)
    assert metric(metrics, "batcher_ready") == 1


async def test_readiness_comes_back_after_a_failed_run_without_traffic(
    make_client: MakeClient, real_model: FaultInjector
) -> None:
    """Out of rotation, a server gets no traffic; a probe run brings it back."""
    client = await make_client(model=real_model)
    real_model.fail_next = 1
    assert (await error_of(await client.post("/predict", json=ONE), 500))["type"] == "model_error"
    assert (await client.get("/readyz")).status == 503
    deadline = time.monotonic() + 5
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline, "readiness did not come back"
        await asyncio.sleep(0.05)
    assert real_model.runs[-1] == (1, False)  # the probe: one row, succeeded


class FailsOnLongRows(FakeModel):
    """Fails any run that holds a row of 7 tokens or more: one bad row in a batch."""

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
        if self.armed and int(attention_mask.sum(axis=1).max()) >= 7:
            raise RuntimeError("this row breaks the model")
        return super().run(input_ids, attention_mask, token_type_ids)


async def test_one_bad_row_fails_alone_not_its_batch(make_batcher: MakeBatcher) -> None:
    batcher, model, metrics = make_batcher(model=FailsOnLongRows(num_labels=4), held=True, instances=1, max_wait_s=0)
    first = batcher.submit(row(3))
    await model.started()
    rows = [batcher.submit(row(3)), batcher.submit(row(9)), batcher.submit(row(3))]
    model.gate.set()
    await first
    outcomes = await asyncio.gather(*rows, return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == ["Prediction", "ModelFailed", "Prediction"]
    assert not batcher.last_run_failed  # the model works: only that row is bad
    assert metric(metrics, "batcher_rejected_total", reason="model_error") == 1


async def test_a_hung_run_fails_liveness_after_liveness_hang_s(
    make_client: MakeClient, real_model: FaultInjector
) -> None:
    client = await make_client("server.liveness_hang_s=0.3", "batching.request_timeout_s=0.1", model=real_model)
    real_model.hold.clear()
    await error_of(await client.post("/predict", json=ONE), 504)
    assert (await client.get("/healthz")).status == 200  # hung, but not yet for liveness_hang_s
    batcher = client.app[MODELS].get().batcher
    await eventually(lambda: batcher.longest_run_s > 0.3)
    assert (await error_of(await client.get("/healthz"), 503))["type"] == "unhealthy"
    real_model.hold.set()
    await eventually(lambda: batcher.unanswered == 0)
    assert (await client.get("/healthz")).status == 200


async def test_a_batch_is_admitted_whole_or_not_at_all(make_client: MakeClient) -> None:
    model = FakeModel()  # timing: the model is held so the queue fills
    client = await make_client(
        "batching.max_queue_size=4", "batching.instances=1", "batching.max_batch_size=1", model=model
    )
    model.armed = True
    model.gate.clear()
    batcher = client.app[MODELS].get().batcher
    held = [asyncio.ensure_future(client.post("/predict", json=ONE))]
    await model.started()
    held.append(asyncio.ensure_future(client.post("/predict", json=ONE)))
    await eventually(lambda: batcher.unanswered == 2)  # one running, one staged
    held += [asyncio.ensure_future(client.post("/predict", json=ONE)) for _ in range(2)]
    await eventually(lambda: batcher.unanswered == 4)  # two queued: room for two more
    refused = await client.post("/predict/batch", json={"items": [ONE] * 3})
    assert (await error_of(refused, 429))["type"] == "queue_full"
    assert batcher.unanswered == 4  # none of the three was admitted
    never = await client.post("/predict/batch", json={"items": [ONE] * 5})
    assert "can never fit" in (await error_of(never, 413))["message"]
    model.gate.set()
    assert [r.status for r in await asyncio.gather(*held)] == [200] * 4


async def test_a_tokenizer_that_reads_nothing_gives_422_not_an_empty_row(make_batcher: MakeBatcher) -> None:
    """No post-processor, and a normalizer that drops everything: zero ids. Offline, and in
    serving, where the worker thread tokenizes: that row fails alone, its batch is answered."""
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "[SEP]": 1, "[PAD]": 2}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Replace(Regex("^用户：播放音乐$"), "")
    template = InputFormat(
        kind="dialogue", turns="all", user_marker="用户：", other_marker="助手：", separator="[SEP]", side="left",
        clean=True, max_length=16,
    )  # fmt: skip
    encoder = TextEncoder(Tokens(tokenizer, special_tokens(tokenizer, {}), max_length=16, side="left"), template)
    with pytest.raises(ValidationFailed, match="no turn has text the model can read"):
        encoder.encode_dialogue([("user", "播放音乐")])
    batcher, model, _ = make_batcher(encode=encoder.encode_batch, held=True, instances=1, max_wait_s=0)
    first = batcher.submit(encoder.prepare([("user", "你好")], tokenize=False))
    await model.started()
    rows = [batcher.submit(encoder.prepare([("user", text)], tokenize=False)) for text in ("播放音乐", "天气")]
    model.gate.set()
    outcomes = await asyncio.gather(first, *rows, return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == ["Prediction", "ValidationFailed", "Prediction"]
    assert outcomes[1].status == 422 and "can read" in str(outcomes[1].body())  # type: ignore[union-attr]
    assert not batcher.last_run_failed


async def test_an_error_while_settling_a_batch_answers_500_at_once(
    make_batcher: MakeBatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A callback's exception is lost to the loop's handler: it must not leave the request
    to its deadline."""
    batcher, _, _ = make_batcher(request_timeout_s=5)

    def broken(*args: object) -> None:
        raise ZeroDivisionError("a bug while settling")

    monkeypatch.setattr(type(batcher), "_resolve", broken)
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        await batcher.submit(row(3))
    assert type(raised.value).__name__ == "InternalError"
    assert time.monotonic() - started < 1


async def test_one_deadline_timer_answers_each_request_at_its_own_deadline(make_batcher: MakeBatcher) -> None:
    """Requests admitted at different times, one running, the rest queued behind it: each
    gets its 504 at its own deadline (not the first one's, not the last one's)."""
    batcher, model, _ = make_batcher(held=True, instances=1, max_wait_s=0, request_timeout_s=0.3)
    loop = asyncio.get_running_loop()
    admitted = loop.time()
    running = batcher.submit(row(3))
    await model.started()
    await asyncio.sleep(0.1)
    later = batcher.submit(row(3))
    answered_at: dict[str, float] = {}

    async def when(name: str, future: asyncio.Future[Any]) -> None:
        with pytest.raises(DeadlineExceeded):
            await future
        answered_at[name] = loop.time() - admitted

    await asyncio.gather(when("running", running), when("later", later))
    assert 0.28 <= answered_at["running"] < 0.38
    assert 0.38 <= answered_at["later"] < 0.5
    model.gate.set()


async def test_answered_requests_do_not_pile_up_behind_the_deadline_timer(make_batcher: MakeBatcher) -> None:
    """Only the unanswered wait for the deadline timer: thousands answered within their
    timeout leave nothing behind (nor does a client that hung up)."""
    batcher, _, _ = make_batcher(max_wait_s=0, request_timeout_s=30)
    for _ in range(20):
        futures = [batcher.submit(row(3)) for _ in range(100)]
        futures[0].cancel()
        await asyncio.gather(*futures, return_exceptions=True)
    assert len(batcher._deadlines) <= 100


async def test_the_openapi_document_lists_every_status_and_limit(make_client: MakeClient) -> None:
    client = await make_client("server.max_batch_items=8", "server.max_turns=16", "server.max_text_chars=100")
    spec = await (await client.get("/openapi.json")).json()
    predict = spec["paths"]["/predict"]["post"]["responses"]
    assert "shutting_down" in predict["503"]["description"] and "not_ready" in predict["503"]["description"]
    assert "invalid_body" in predict["400"]["description"] and "cors_forbidden" in predict["403"]["description"]
    schemas = spec["components"]["schemas"]
    assert schemas["BatchPredictRequest"]["properties"]["items"]["maxItems"] == 8
    assert schemas["PredictRequest"]["properties"]["turns"]["maxItems"] == 16
    assert schemas["Turn"]["properties"]["text"]["maxLength"] == 100
    assert "unhealthy" in spec["paths"]["/healthz"]["get"]["responses"]["503"]["description"]


async def test_the_log_filter_keeps_undecodable_bodies_to_one_line(caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp.web_protocol import RequestPayloadError

    from batcher.application import MalformedRequestFilter

    try:
        raise RequestPayloadError("Can not decode content-encoding: gzip\n2026 ERROR forged")
    except RequestPayloadError:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, "", 0, "Unhandled exception", (), None)
        import sys

        record.exc_info = sys.exc_info()
    assert MalformedRequestFilter().filter(record)
    assert record.levelname == "WARNING" and record.exc_info is None and "\n" not in record.getMessage()
