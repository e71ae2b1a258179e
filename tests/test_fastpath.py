"""The fast lane (batcher.fastpath) over raw loopback sockets: a plain POST /predict gets
the same answer there as through aiohttp and the middleware, and anything that is not
plain is handed to aiohttp on the same connection."""

from __future__ import annotations

import asyncio
import json
import random
import re
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from batcher.fastpath import PLAIN_HEADERS, Lane
from batcher.handlers import METRICS
from tests.conftest import FakeModel, MakeClient, metric

ONE = {"turns": [{"text": "你好"}]}
OFF_LANE = "X-Lane: off"
"""A header the lane does not take: the same request then goes through aiohttp."""
PREDICT = "POST /predict HTTP/1.1"
Answer = tuple[int, dict[str, str], bytes]


def raw(
    body: bytes | dict[str, Any], *headers: str, line: str = "POST /predict HTTP/1.1", length: bool = True
) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    fields = ["Host: test", "Content-Type: application/json", *headers]
    if length:
        fields.append(f"Content-Length: {len(data)}")
    return f"{line}\r\n{''.join(field + chr(13) + chr(10) for field in fields)}\r\n".encode() + data


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    lines = head.split("\r\n")
    headers = {}
    for field in lines[1:]:
        if field:
            name, _, value = field.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, await reader.readexactly(int(headers["content-length"]))


async def exchange(client: TestClient[Any, Any], *writes: bytes, answers: int = 1) -> list[Answer]:
    """Answers to `writes`, sent on one new connection (a pause between writes)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        for number, data in enumerate(writes):
            if number:
                await asyncio.sleep(0.05)
            writer.write(data)
            await writer.drain()
        return [await asyncio.wait_for(read_answer(reader), 10) for _ in range(answers)]
    finally:
        writer.close()


def lane(client: TestClient[Any, Any]) -> Lane:
    found = client.server.runner.server.lane  # type: ignore[union-attr]
    assert isinstance(found, Lane)
    return found


def comparable(answer: Answer) -> tuple[int, Any, set[str], dict[str, str]]:
    """What must agree between the lanes: status, body (timings and the generated request id
    aside), header names, and the headers whose values do not vary."""
    status, headers, body = answer
    data = json.loads(body)
    if isinstance(data, dict) and "timing" in data:
        data["timing"] = sorted(data["timing"])
        data["inference_time_ms"] = "varies"
    stable = {k: v for k, v in headers.items() if k in ("content-type", "server", "x-model-version", "retry-after")}
    stable |= {k: v for k, v in headers.items() if k in ("www-authenticate", "connection", "x-batch-size")}
    if not re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]):
        stable["x-request-id"] = headers["x-request-id"]
    return status, data, set(headers), stable


CASES: list[tuple[str, bytes | dict[str, Any], tuple[str, ...], int]] = [
    ("one turn", ONE, (), 200),
    (
        "several turns, every probability",
        {
            "turns": [{"speaker": "user", "text": "明天天气"}, {"speaker": "bot", "text": "哪里"}, {"text": "北京"}],
            "return_all_probs": True,
        },
        (),
        200,
    ),
    ("a request id echoed", ONE, ("X-Request-Id: abc-123",), 200),
    ("a request id replaced", ONE, ("x-request-id: not one!",), 200),
    ("unknown fields ignored", {"turns": [{"text": "hi", "mood": 1}], "more": 2}, (), 200),
    ("header names in any case, spaced values", ONE, ("connection:   Keep-Alive  ", "USER-AGENT: t"), 200),
    (
        "what an ingress and a tracer add",
        ONE,
        (
            "X-Forwarded-For: 10.0.0.1, 10.0.0.2",
            "X-Forwarded-Proto: https",
            "X-Real-IP: 10.0.0.1",
            "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        200,
    ),
    ("not JSON", b"{x}", (), 400),
    ("an empty body", b"", (), 400),
    ("not an object", b"[1]", (), 422),
    ("no turns", {"turns": []}, (), 422),
    ("blank text only", {"turns": [{"text": " \u3000 "}]}, (), 422),
    ("a wrong type", {"turns": [{"text": 1}]}, (), 422),
    ("a text over max_text_chars", {"turns": [{"text": "长" * 21}]}, (), 413),
    ("turns over max_turns", {"turns": [{"text": "a"}] * 5}, (), 413),
]


@pytest.mark.parametrize(("body", "headers", "status"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
async def test_a_plain_request_gets_the_same_answer_in_either_lane(
    make_client: MakeClient, body: bytes | dict[str, Any], headers: tuple[str, ...], status: int
) -> None:
    client = await make_client("server.max_text_chars=20", "server.max_turns=4")
    before = lane(client).answered
    [fast] = await exchange(client, raw(body, *headers))
    assert lane(client).answered == before + 1
    [slow] = await exchange(client, raw(body, *headers, OFF_LANE))
    assert lane(client).answered == before + 1
    assert fast[0] == status
    assert comparable(fast) == comparable(slow)
    invalid = metric(client.app[METRICS], "batcher_rejected_total", reason="invalid")
    assert invalid == (2 if status in (400, 413, 422) else 0)


async def test_bearer_tokens_apply_in_the_lane(make_client: MakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_TOKENS", "secret-one")
    client = await make_client('server.auth_tokens_env="TEST_TOKENS"')
    for headers, status in [
        ((), 401),
        (("Authorization: Bearer wrong",), 401),
        (("Authorization: Bearer secret-one",), 200),
    ]:
        [fast] = await exchange(client, raw(ONE, *headers))
        [slow] = await exchange(client, raw(ONE, *headers, OFF_LANE))
        assert fast[0] == status
        assert comparable(fast) == comparable(slow)
    assert lane(client).answered == 3
    assert metric(client.app[METRICS], "batcher_rejected_total", reason="unauthorized") == 4


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (raw(b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked", length=False), 422),
        (raw(ONE, line="POST /predict?x=1 HTTP/1.1"), 200),
        (raw(ONE, line="POST /predict HTTP/1.0"), 200),
        (raw(ONE, "Connection: close"), 200),
        (raw(ONE, "Origin: http://elsewhere.example"), 403),
        (raw(ONE, "Content-Length: 2"), 400),  # a second Content-Length
        (raw(ONE, length=False) + b"", 400),  # no Content-Length: an empty body
        (raw(b"", "Content-Length: " + "9" * 5000, length=False), 400),
        (raw(ONE, "User-Agent: caf\u00e9"), 200),  # not ASCII
        (raw(ONE, "X-Folded: a", " b"), 400),  # an obsolete line folding
        (raw(ONE, line="GET /predict HTTP/1.1"), 405),
    ],
    ids=[
        "chunked",
        "query",
        "http-1.0",
        "close",
        "origin",
        "two-lengths",
        "no-length",
        "huge-length",
        "non-ascii",
        "folded",
        "get",
    ],
)
async def test_what_is_not_plain_is_answered_by_aiohttp(make_client: MakeClient, data: bytes, status: int) -> None:
    client = await make_client()
    [(answer, _, body)] = await exchange(client, data)
    assert answer == status
    assert "error" in json.loads(body) or answer == 200
    assert lane(client).answered == 0


async def test_a_request_split_over_two_writes_is_answered(make_client: MakeClient) -> None:
    client = await make_client()
    data = raw(ONE)
    [(status, _, _)] = await exchange(client, data[:20], data[20:-5], data[-5:])
    assert status == 200


async def test_pipelined_requests_are_answered_in_order_across_the_hand_over(make_client: MakeClient) -> None:
    client = await make_client()
    data = (
        raw(ONE, "X-Request-Id: first") + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + raw(ONE, "X-Request-Id: last")
    )
    answers = await exchange(client, data, answers=3)
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [a[1].get("x-request-id") for a in answers][::2] == ["first", "last"]
    assert json.loads(answers[1][2]) == {"status": "ok"}
    assert lane(client).answered == 1  # the connection stayed with aiohttp after /healthz


async def test_a_pipelined_flood_is_answered_in_order(make_client: MakeClient) -> None:
    client = await make_client()
    data = b"".join(raw(ONE, f"X-Request-Id: r{number}") for number in range(300))
    answers = await exchange(client, data, answers=300)
    assert [a[1]["x-request-id"] for a in answers] == [f"r{number}" for number in range(300)]
    assert {a[0] for a in answers} == {200}
    assert lane(client).answered == 300


async def test_a_client_that_hangs_up_has_its_request_skipped(make_client: MakeClient) -> None:
    model = FakeModel()
    client = await make_client("batching.instances=1", model=model)
    model.armed = True
    model.gate.clear()  # timing: the first request's run is held while the second waits in the queue
    first = asyncio.ensure_future(exchange(client, raw(ONE)))
    await model.started()
    _, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(raw(ONE))
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.sleep(0.1)
    model.gate.set()
    [(status, _, _)] = await first
    assert status == 200
    metrics = client.app[METRICS]
    for _ in range(100):
        if metric(metrics, "batcher_rejected_total", reason="disconnected") == 1:
            break
        await asyncio.sleep(0.02)
    assert metric(metrics, "batcher_rejected_total", reason="disconnected") == 1
    assert model.batches == [1]
    assert lane(client).answered == 1


async def test_idle_connections_are_closed_after_the_keepalive_timeout(make_client: MakeClient) -> None:
    client = await make_client("server.keepalive_timeout_s=0.3")
    used_reader, used = await asyncio.open_connection(client.host, client.port)
    used.write(raw(ONE))
    assert (await read_answer(used_reader))[0] == 200
    silent_reader, silent = await asyncio.open_connection(client.host, client.port)
    assert await asyncio.wait_for(used_reader.read(), 3) == b""
    assert await asyncio.wait_for(silent_reader.read(), 3) == b""
    used.close()
    silent.close()


async def test_random_header_values_get_an_answer_from_one_lane_or_the_other(make_client: MakeClient) -> None:
    """Seeded fuzz: a header of the lane's own list, or another, with random bytes (no line
    break; half the time visible ASCII only) as its value. Each gets one answer, 200 or
    aiohttp's 400, never a 500 or a hang."""
    client = await make_client()
    randomness = random.Random(18)
    names = [name.decode() for name in sorted(PLAIN_HEADERS - {b"content-length"})] + ["X-Other", "Content-Encoding"]
    statuses = set()
    for _ in range(150):
        alphabet = [*range(0, 10), 11, 12, *range(14, 256)] if randomness.random() < 0.5 else range(32, 127)
        value = bytes(randomness.choice(alphabet) for _ in range(8))
        name = randomness.choice(names).encode()
        data = raw(ONE).replace(b"\r\n\r\n", b"\r\n" + name + b": " + value + b"\r\n\r\n", 1)
        reader, writer = await asyncio.open_connection(client.host, client.port)
        writer.write(data)
        status, _, _ = await asyncio.wait_for(read_answer(reader), 10)
        writer.close()
        statuses.add(status)
    assert statuses <= {200, 400, 401, 415} and 200 in statuses
    assert lane(client).answered > 0
