"""The fast lane (batcher.fastpath) over raw loopback sockets: a plain POST /predict gets
the same answer there as through aiohttp and the middleware, anything that is not plain is
handed to aiohttp on the same connection, and a corpus of odd raw requests gets the same
answers with the lane on and off."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from batcher.fastpath import ANSWERS_PER_CALLBACK, BUFFER_LIMIT, PLAIN_HEADERS, Lane, LaneServer
from batcher.handlers import METRICS
from tests.conftest import FakeModel, MakeClient, eventually, metric

ONE = {"turns": [{"text": "你好"}]}
OFF_LANE = "X-Lane: off"
"""A header the lane does not take: the same request then goes through aiohttp."""
PREDICT = "POST /predict HTTP/1.1"
ONE_READ_BYTES = 256 * 1024
"""The most bytes asyncio's or uvloop's transport reads from a socket at once."""
Answer = tuple[int, dict[str, str], bytes]


def raw(
    body: bytes | dict[str, Any],
    *headers: str,
    line: str = "POST /predict HTTP/1.1",
    length: bool = True,
    host: bool = True,
) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    fields = [*(["Host: test"] if host else []), "Content-Type: application/json", *headers]
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


@contextmanager
def lane_off(client: TestClient[Any, Any]) -> Iterator[None]:
    """Meanwhile new connections go straight to aiohttp, as with the lane off: the same bytes
    through the other lane."""
    server = client.server.runner.server  # type: ignore[union-attr]
    assert isinstance(server, LaneServer)
    taken, server.lane = server.lane, None
    try:
        yield
    finally:
        server.lane = taken


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
    request_id = headers.get("x-request-id", "")  # none on aiohttp's answer to a malformed request
    if not re.fullmatch(r"[0-9a-f]{32}", request_id):
        stable["x-request-id"] = request_id
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
    ("the connection's last request", ONE, ("Connection: close",), 200),
    ("the connection's last request, not JSON", b"{x}", ("Connection: Close",), 400),
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
        (raw(ONE, "Connection: upgrade"), 200),
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
        "connection-option",
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
    assert statuses <= {200, 400, 401, 415, 422} and 200 in statuses  # 422: a bad x-priority or x-deadline-ms
    assert lane(client).answered > 0


async def test_a_request_without_host_gets_400_in_either_lane(make_client: MakeClient) -> None:
    """HTTP/1.1 requires Host (RFC 9112 3.2): aiohttp answers 400 without it, so the lane does
    not take such a request. HTTP/1.0 needs none, in either lane."""
    client = await make_client()
    [fast] = await exchange(client, raw(ONE, host=False))
    with lane_off(client):
        [slow] = await exchange(client, raw(ONE, host=False))
    assert fast[0] == 400
    assert "Missing 'Host' header" in json.loads(fast[2])["error"]["message"]
    assert comparable(fast) == comparable(slow)
    assert lane(client).answered == 0
    [old] = await exchange(client, raw(ONE, line="POST /predict HTTP/1.0", host=False))
    assert old[0] == 200
    [(status, _, _)] = await exchange(client, raw(ONE, "Host:", host=False))  # present, if empty: as aiohttp
    assert status == 200 and lane(client).answered == 1


async def test_a_pipelined_burst_of_failing_requests_is_answered_a_round_at_a_time(make_client: MakeClient) -> None:
    """4,000 pipelined requests that fail at once (not JSON: 400), queued behind a prediction
    held in the model: meanwhile the lane stops reading past BUFFER_LIMIT (plus the read that
    crossed it); once the prediction is answered, it answers the burst in order, in rounds of
    at most ANSWERS_PER_CALLBACK (a count, not a clock), yielding the loop between them."""
    model = FakeModel()
    client = await make_client("batching.instances=1", model=model)
    model.armed = True
    model.gate.clear()  # timing: the first request's run is held while the burst arrives
    burst = 4000
    data = raw(ONE, "X-Request-Id: held") + b"".join(
        raw(b"{x}", f"X-Request-Id: b{number}", "User-Agent: burst/1 (failing on purpose)") for number in range(burst)
    )
    assert len(data) > BUFFER_LIMIT + ONE_READ_BYTES
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(data)
        await model.started()
        await eventually(lambda: lane(client).most_buffered > 0)  # reading paused, the rest waits in the socket
        model.gate.set()
        answers = [await asyncio.wait_for(read_answer(reader), 10) for _ in range(burst + 1)]
    finally:
        writer.close()
    assert [answer[1]["x-request-id"] for answer in answers] == ["held", *(f"b{n}" for n in range(burst))]
    assert [answer[0] for answer in answers] == [200] + [400] * burst
    assert {json.loads(answer[2])["error"]["type"] for answer in answers[1:]} == {"invalid_json"}
    assert lane(client).most_per_callback == ANSWERS_PER_CALLBACK  # reached, never passed
    assert BUFFER_LIMIT < lane(client).most_buffered <= BUFFER_LIMIT + ONE_READ_BYTES


OK = raw(ONE)
BAD = raw(b"{x}")
CHUNKED = raw(b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked", length=False)
LENGTH = len(json.dumps(ONE))
HEAD_END = OK.index(b"\r\n\r\n") + 4
CORPUS: list[tuple[str, list[bytes], list[int], int]] = [
    # Content-Length variants
    ("length with a sign", [raw(ONE, f"Content-Length: +{LENGTH}", length=False)], [400], 0),
    ("length with leading zeros", [raw(ONE, f"Content-Length: 00{LENGTH}", length=False)], [200], 1),
    ("length padded with tabs", [raw(ONE, f"Content-Length:\t{LENGTH}\t", length=False)], [200], 1),
    ("length as a list", [raw(ONE, f"Content-Length: {LENGTH}, {LENGTH}", length=False)], [400], 0),
    ("length negative", [raw(ONE, "Content-Length: -1", length=False)], [400], 0),
    ("length in hex", [raw(ONE, "Content-Length: 0x10", length=False)], [400], 0),
    ("length empty", [raw(ONE, "Content-Length:", length=False)], [400], 0),
    ("length twice, equal", [raw(ONE, f"Content-Length: {LENGTH}")], [400], 0),
    ("length name spaced", [raw(ONE, f"Content-Length : {LENGTH}", length=False)], [400], 0),
    ("length over the lane's body limit", [raw({"turns": [{"text": "长" * 30000}]})], [413], 0),
    # Transfer-Encoding beside Content-Length
    (
        "chunked, then a length",
        [raw(b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked", "Content-Length: 13", length=False)],
        [400],
        0,
    ),
    (
        "a length, then chunked",
        [raw(b"2\r\n{}\r\n0\r\n\r\n", "Content-Length: 13", "Transfer-Encoding: chunked", length=False)],
        [400],
        0,
    ),
    ("identity beside a length", [raw(ONE, "Transfer-Encoding: identity")], [400], 0),
    ("gzip, chunked", [raw(b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: gzip, chunked", length=False)], [422], 0),
    (
        "a coding named like chunked",
        [raw(b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: xchunked", length=False)],
        [400],
        0,
    ),
    # folded and bare-LF header lines
    ("folded with a space", [raw(ONE, "User-Agent: a", " b")], [400], 0),
    ("folded with a tab", [raw(ONE, "User-Agent: a", "\tb")], [400], 0),
    ("the first header folded", [OK.replace(b"\r\nHost", b"\r\n Host", 1)], [400], 0),
    ("bare LF everywhere", [OK[:HEAD_END].replace(b"\r\n", b"\n") + OK[HEAD_END:]], [400], 0),
    ("bare LF after the request line", [OK.replace(b"\r\n", b"\n", 1)], [400], 0),
    ("bare LF after a header", [OK.replace(b"Host: test\r\n", b"Host: test\n", 1)], [400], 0),
    ("a bare CR in a header", [OK.replace(b"Host: test\r\n", b"Host: test\rx\r\n", 1)], [400], 0),
    # control bytes
    ("NUL in a value", [raw(ONE, "User-Agent: a\x00b")], [400], 0),
    ("a control byte in a value", [raw(ONE, "User-Agent: a\x01b")], [400], 0),
    ("DEL in a value", [raw(ONE, "User-Agent: a\x7fb")], [400], 0),
    ("a tab in a value", [raw(ONE, "User-Agent: a\tb")], [200], 1),
    ("a control byte in a name", [raw(ONE, "User\x01Agent: t")], [400], 0),
    ("a name spaced before its colon", [raw(ONE, "User-Agent : t")], [400], 0),
    ("an empty name", [raw(ONE, ": t")], [400], 0),
    ("NUL in the request line", [raw(ONE, line="POST /predict\x00 HTTP/1.1")], [400], 0),
    # odd request lines
    ("two spaces", [raw(ONE, line="POST  /predict HTTP/1.1")], [200], 0),
    ("a lower-case method", [raw(ONE, line="post /predict HTTP/1.1")], [400], 0),
    ("a trailing space", [raw(ONE, line="POST /predict HTTP/1.1 ")], [400], 0),
    ("HTTP/1.2", [raw(ONE, line="POST /predict HTTP/1.2")], [400], 0),
    ("HTTP/2.0", [raw(ONE, line="POST /predict HTTP/2.0")], [200], 0),
    ("no version", [raw(ONE, line="POST /predict")], [200], 0),
    ("the absolute form", [raw(ONE, line="POST http://test/predict HTTP/1.1")], [200], 0),
    ("a fragment", [raw(ONE, line="POST /predict#x HTTP/1.1")], [200], 0),
    ("a trailing slash", [raw(ONE, line="POST /predict/ HTTP/1.1")], [404], 0),
    ("upper case", [raw(ONE, line="POST /PREDICT HTTP/1.1")], [404], 0),
    ("an empty line first", [b"\r\n" + OK], [200], 0),
    # Host
    ("no Host", [raw(ONE, host=False)], [400], 0),
    ("an empty Host", [raw(ONE, "Host:", host=False)], [200], 1),
    ("two Hosts", [raw(ONE, "Host: other")], [400], 0),
    ("no Host in HTTP/1.0", [raw(ONE, line="POST /predict HTTP/1.0", host=False)], [200], 0),
    # pipelines mixing plain and not plain
    ("plain, failing, plain", [OK + BAD + OK], [200, 400, 200], 3),
    ("plain, CORS, plain", [OK + raw(ONE, "Origin: http://x.example") + OK], [200, 403, 200], 1),
    ("plain, chunked, plain", [OK + CHUNKED + OK], [200, 422, 200], 1),
    ("plain, GET /healthz, plain", [OK + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + OK], [200, 200, 200], 1),
    (
        "plain, HTTP/1.0, plain",
        [OK + raw(ONE, "Connection: keep-alive", line="POST /predict HTTP/1.0") + OK],
        [200, 200, 200],
        1,
    ),
    ("failing, plain, then plain", [BAD + OK, OK], [400, 200, 200], 3),
    ("plain, then garbage", [OK, b"garbage\r\n\r\n"], [200, 400], 1),
    ("plain, then no Host", [OK, raw(ONE, host=False)], [200, 400], 1),
    # split writes
    ("split in the request line", [OK[:10], OK[10:]], [200], 0),
    ("split before the blank line", [OK[: HEAD_END - 2], OK[HEAD_END - 2 :]], [200], 0),
    ("split in the body", [OK[:-3], OK[-3:]], [200], 0),
    ("a plain one and half the next", [OK + OK[:30], OK[30:]], [200, 200], 1),
]


async def in_both_lanes(client: TestClient[Any, Any], writes: list[bytes], answers: int) -> tuple[list[Answer], ...]:
    on = await exchange(client, *writes, answers=answers)
    with lane_off(client):
        off = await exchange(client, *writes, answers=answers)
    return on, off


@pytest.mark.parametrize(
    ("writes", "statuses", "taken"), [case[1:] for case in CORPUS], ids=[case[0] for case in CORPUS]
)
async def test_raw_requests_get_the_same_answers_with_the_lane_on_and_off(
    make_client: MakeClient, writes: list[bytes], statuses: list[int], taken: int
) -> None:
    """The audit's classes of raw requests, as bytes on one connection (a pause between
    writes): the same statuses and bodies, in the same order, with the lane on and off; and
    `taken` of them answered by the lane."""
    client = await make_client()
    on, off = await in_both_lanes(client, writes, len(statuses))
    assert [answer[0] for answer in on] == statuses
    assert [comparable(answer) for answer in on] == [comparable(answer) for answer in off]
    assert lane(client).answered == taken


async def answers_until_closed(client: TestClient[Any, Any], data: bytes) -> list[Answer]:
    """Every answer to `data`, sent on one new connection, until the server closes it."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    answers = []
    try:
        writer.write(data)
        while True:
            try:
                answers.append(await asyncio.wait_for(read_answer(reader), 10))
            except asyncio.IncompleteReadError as closed:
                assert not closed.partial
                return answers
    finally:
        writer.close()


async def test_nothing_after_a_connection_close_request_is_read(make_client: MakeClient) -> None:
    """RFC 9112, 9.6: after answering a request with `Connection: close` a server closes the
    connection and processes nothing after it. The lane does; aiohttp answers the whole read
    (the good request before it too) with one 400, `data after close`, and logs a traceback."""
    client = await make_client()
    data = OK + raw(ONE, "Connection: close") + OK
    on = await answers_until_closed(client, data)
    assert [answer[0] for answer in on] == [200, 200]
    assert on[-1][1]["connection"] == "close"
    assert lane(client).answered == 2
    with lane_off(client):
        assert [answer[0] for answer in await answers_until_closed(client, data)] == [400]


@pytest.mark.parametrize(
    ("data", "statuses"),
    [
        (OK + b"garbage\r\n\r\n", [200, 400]),
        (OK + BAD + raw(ONE, host=False) + OK, [200, 400, 400]),
        (raw(ONE, "Content-Length: 3", length=False), [400, 400]),  # the body's rest as a request
    ],
    ids=["garbage", "no-host", "short-length"],
)
async def test_a_malformed_request_after_plain_ones_in_one_read_ends_as_aiohttp_answers(
    make_client: MakeClient, data: bytes, statuses: list[int]
) -> None:
    """Where the lanes part, on purpose: aiohttp answers a read that holds a malformed request
    with that one 400 alone, dropping the well-formed requests before it in the same read
    (its parser's error replaces the read's messages), though it answers them when they came
    in an earlier read. The lane answers each request in order, whatever the reads: then
    aiohttp's answers, the same 400 last, and the connection closed."""
    client = await make_client()
    on = await answers_until_closed(client, data)
    with lane_off(client):
        off = await answers_until_closed(client, data)
    assert [answer[0] for answer in on] == statuses
    assert [comparable(answer) for answer in on[-len(off) :]] == [comparable(answer) for answer in off]
    assert json.loads(off[-1][2])["error"]["type"] == "malformed_http"
    assert lane(client).answered == len(on) - 1
