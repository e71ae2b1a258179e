"""The load generator's modes (loadtest/modes.py): a priority mix, a per-request deadline,
retry storms and polite retries with a probe beside them.

These tests are about the generator's own counting: what it sends and how it tallies what
comes back. So the server is a stand-in, a tiny aiohttp stub in this file that answers 200
or 429 by the headers it receives and logs everything it answered; the tests compare the
generator's report with that log. batcher's own behaviour under these modes is measured by
`make bench` (bench/promises.py), not here."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loadtest import report
from loadtest.__main__ import build_parser, parse_modes
from loadtest.corpus import DEFAULT_CORPUS, Corpus, classify_request
from loadtest.driver import Load
from loadtest.http import HttpClient, Reply
from loadtest.modes import Modes, parse_priority_mix, retry_after_s, server_total_ms
from loadtest.steps import run_steps

RETRY_AFTER_MS = 150


@dataclass
class Stub:
    """Answers POST /predict by what the request carries; logs (time, priority, deadline,
    what it answered, body, connection header) for each. `alternate`: every other request
    is refused (429 queue_full, x-retry-after-ms RETRY_AFTER_MS), whatever it carries."""

    alternate: bool = False
    log: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        n = len(self.log)
        priority = request.headers.get("x-priority")
        deadline = request.headers.get("x-deadline-ms")
        entry: dict[str, Any] = {
            "at": time.perf_counter(),
            "priority": priority,
            "deadline": deadline,
            "body": body,
            "connection": request.headers.get("connection", "").lower(),
        }
        self.log.append(entry)
        if self.alternate:
            refuse = n % 2 == 0
            entry["answer"] = "429 queue_full" if refuse else "200"
            return refused("queue_full", RETRY_AFTER_MS) if refuse else answer(5.0)
        if priority == "low":
            entry["answer"] = "429 queue_full"
            return refused("queue_full", 1000)
        if deadline is not None and n % 3 == 0:
            entry["answer"] = "429 predicted_late"
            return refused("predicted_late", 40)
        if deadline is not None and n % 5 == 1:
            entry["answer"] = "200 late server-side"
            return answer(float(deadline) + 50)
        if deadline is not None and n % 7 == 2:
            await asyncio.sleep(0.15)
            entry["answer"] = "200 late client-side"
            return answer(2.0)
        entry["answer"] = "200"
        return answer(2.0)


def answer(total_ms: float) -> web.Response:
    body = {"intent_id": 1, "timing": {"queue_ms": 0.1, "inference_ms": 1.0, "total_ms": total_ms, "batch_size": 1}}
    return web.json_response(body)


def refused(kind: str, retry_ms: int) -> web.Response:
    headers = {"Retry-After": str(max(1, -(-retry_ms // 1000))), "x-retry-after-ms": str(retry_ms)}
    return web.json_response({"error": {"type": kind, "message": "no"}}, status=429, headers=headers)


async def serve(aiohttp_server: Any, stub: Stub) -> str:
    app = web.Application()
    app.router.add_post("/predict", stub.handle)
    server: TestServer = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


def corpus() -> Corpus:
    return Corpus(DEFAULT_CORPUS, seed=3)


async def test_priority_mix_sends_the_shares_and_reports_by_priority(aiohttp_server: Any) -> None:
    stub = Stub()
    url = await serve(aiohttp_server, stub)
    modes = Modes(priority_mix=parse_priority_mix("high=0.2,normal=0.5,low=0.1"))
    rows = await run_steps(
        url, [Load("closed", 4)], corpus=corpus(), duration_s=1.0, warmup_s=0, progress=False, modes=modes
    )
    row = rows[0]
    sent = Counter(entry["priority"] or "none" for entry in stub.log)
    total = sum(sent.values())
    assert total == row["requests"] > 200
    by = row["modes"]["by_priority"]
    assert {name: stats["requests"] for name, stats in by.items()} == dict(sent)
    for name, share in (("high", 0.2), ("normal", 0.5), ("low", 0.1), ("none", 0.2)):
        assert sent[name] / total == pytest.approx(share, abs=0.06)
    assert by["low"]["statuses"] == {"429": sent["low"]} and by["low"]["refused_share"] == 1.0
    assert by["high"]["statuses"] == {"200": sent["high"]} and by["high"]["refused_share"] == 0.0
    assert 0 < by["high"]["p50_ms"] <= by["high"]["p99_ms"] <= by["high"]["max_ms"]
    assert by["low"]["ok_p99_ms"] is None
    assert row["modes"]["refused_by_type"] == {"queue_full": sent["low"]}
    assert "retry" not in row["modes"] and "deadline" not in row["modes"]
    assert "high" in report.modes_table(rows) and "queue_full" in report.modes_table(rows)


async def test_deadline_counts_goodput_late_answers_and_refusals_by_type(aiohttp_server: Any) -> None:
    stub = Stub()
    url = await serve(aiohttp_server, stub)
    rows = await run_steps(
        url,
        [Load("closed", 3)],
        corpus=corpus(),
        duration_s=1.0,
        warmup_s=0,
        progress=False,
        modes=Modes(deadline_ms=100),
    )
    row = rows[0]
    answers = Counter(entry["answer"] for entry in stub.log)
    assert {entry["deadline"] for entry in stub.log} == {"100"}
    deadline = row["modes"]["deadline"]
    ok = sum(n for kind, n in answers.items() if kind.startswith("200"))
    assert row["statuses"]["200"] == ok == deadline["within"] + deadline["late_200"]
    assert deadline["server_late_200"] == answers["200 late server-side"] > 0
    assert deadline["late_200"] >= answers["200 late client-side"] > 0
    assert deadline["goodput_rps"] == pytest.approx(deadline["within"] / row["duration_s"], rel=1e-3)
    assert deadline["server_time_unknown"] == 0 and deadline["sent"]
    assert row["modes"]["refused_by_type"] == {"predicted_late": answers["429 predicted_late"]}
    assert row["statuses"]["429"] == answers["429 predicted_late"]
    assert row["modes"]["refused_at_door"] <= answers["429 predicted_late"]


async def test_judging_against_a_bound_sends_no_deadline(aiohttp_server: Any) -> None:
    stub = Stub()
    url = await serve(aiohttp_server, stub)
    rows = await run_steps(
        url,
        [Load("open", 100, "constant")],
        corpus=corpus(),
        duration_s=0.5,
        warmup_s=0,
        progress=False,
        modes=Modes(judge_ms=100),
    )
    deadline = rows[0]["modes"]["deadline"]
    assert {entry["deadline"] for entry in stub.log} == {None}
    assert not deadline["sent"] and deadline["server_late_200"] is None
    assert deadline["within"] + deadline["late_200"] == rows[0]["statuses"]["200"] == len(stub.log)


async def test_storm_resends_the_same_request_at_once_and_a_probe_runs_beside(aiohttp_server: Any) -> None:
    stub = Stub(alternate=True)
    url = await serve(aiohttp_server, stub)
    modes = Modes(retry="storm", probe_interval_ms=50)
    rows = await run_steps(
        url, [Load("closed", 1)], corpus=corpus(), duration_s=1.0, warmup_s=0, progress=False, modes=modes
    )
    row = rows[0]
    load = [e for e in stub.log if e["connection"] != "close"]
    probed = [e for e in stub.log if e["connection"] == "close"]
    resends = list(itertools.pairwise(load))
    after_refusal = [(a, b) for a, b in resends if a["answer"].startswith("429")]
    assert len(after_refusal) > 20
    assert all(a["body"] == b["body"] for a, b in after_refusal)  # the same request again
    gaps = sorted(b["at"] - a["at"] for a, b in after_refusal)
    assert gaps[len(gaps) // 2] < 0.05  # at once, no backoff
    retry = row["modes"]["retry"]
    assert retry["mode"] == "storm" and retry["polite_waits"] == 0
    assert retry["ok_rps"] == pytest.approx(row["statuses"]["200"] / row["duration_s"], rel=1e-3)
    probe = retry["probe"]
    assert probe["new_connection_each"] and probe["interval_ms"] == 50
    assert 15 <= probe["requests"] <= 21 and len(probed) == probe["requests"]
    assert sum(probe["statuses"].values()) == probe["requests"]
    assert 0 < probe["p50_ms"] <= probe["p99_ms"] <= probe["max_ms"]
    assert "probe" in report.modes_table(rows)


async def test_polite_clients_wait_what_the_server_asks(aiohttp_server: Any) -> None:
    stub = Stub(alternate=True)
    url = await serve(aiohttp_server, stub)
    modes = Modes(retry="polite")
    rows = await run_steps(
        url, [Load("closed", 1)], corpus=corpus(), duration_s=1.0, warmup_s=0, progress=False, modes=modes
    )
    retry = rows[0]["modes"]["retry"]
    pairs = [(a, b) for a, b in itertools.pairwise(stub.log) if a["answer"].startswith("429")]
    assert pairs and all(a["body"] == b["body"] for a, b in pairs)
    assert all(b["at"] - a["at"] >= RETRY_AFTER_MS / 1000 for a, b in pairs)
    assert retry["polite_waits"] == rows[0]["statuses"]["429"]
    assert len(pairs) in (retry["polite_waits"], retry["polite_waits"] - 1)  # the last wait may outlast the step
    assert retry["polite_wait_mean_ms"] == pytest.approx(RETRY_AFTER_MS)
    assert retry["probe"] is None
    assert 4 <= rows[0]["statuses"]["200"] <= 8  # one answer per ~150 ms wait


async def test_without_modes_requests_and_rows_are_as_before(aiohttp_server: Any) -> None:
    stub = Stub()
    url = await serve(aiohttp_server, stub)
    rows = await run_steps(url, [Load("closed", 2)], corpus=corpus(), duration_s=0.3, warmup_s=0, progress=False)
    assert "modes" not in rows[0]
    assert {(e["priority"], e["deadline"]) for e in stub.log} == {(None, None)}
    client = HttpClient("127.0.0.1", 8000)
    assert client.request("/predict", b"{}") == (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )
    assert b"\r\nx-priority: high\r\n" in client.request("/predict", b"{}", (("x-priority", "high"),))


def test_reply_headers_retry_after_and_server_time() -> None:
    head = b"http/1.1 429 too many requests\r\nretry-after: 2\r\nx-retry-after-ms: 1500\r\ncontent-length: 2"
    reply = Reply(429, head, b"{}")
    assert reply.header("Retry-After") == "2" and reply.header("x-missing") is None
    assert retry_after_s(reply) == 1.5
    assert retry_after_s(Reply(429, b"http/1.1 429 x\r\nretry-after: 3", b"")) == 3.0
    assert retry_after_s(Reply(429, b"http/1.1 429 x\r\nretry-after: soon", b"")) == 0.0
    assert server_total_ms(b'{"timing":{"queue_ms":1,"total_ms":12.5,"batch_size":1}}') == 12.5
    assert server_total_ms(b'{"timing":{"total_ms":7}}') == 7.0
    assert server_total_ms(b"{}") is None


def test_priority_mix_parsing() -> None:
    assert parse_priority_mix("high=0.2,normal=0.8") == (("high", 0.2), ("normal", 0.8))
    assert parse_priority_mix(" LOW=0.5 ") == (("low", 0.5),)
    for bad in ("high=0.7,normal=0.7", "urgent=0.1", "high", "high=x", "high=-0.1"):
        with pytest.raises(ValueError):
            parse_priority_mix(bad)


def test_cli_modes() -> None:
    parser = build_parser()
    assert parse_modes(parser.parse_args(["run"])) is None
    modes = parse_modes(
        parser.parse_args(["run", "--rate", "100", "--priority-mix", "high=0.2", "--deadline-ms", "50"])
    )
    assert modes == Modes(priority_mix=(("high", 0.2),), deadline_ms=50)
    storm = parse_modes(parser.parse_args(["run", "--concurrency", "512", "--retry", "storm"]))
    assert storm is not None and storm.retry == "storm" and storm.probe_interval_ms == 50
    for bad in (["--rate", "10", "--retry", "storm"], ["--priority-mix", "high=2"], ["--deadline-ms", "0"]):
        with pytest.raises(SystemExit):
            parse_modes(parser.parse_args(["run", *bad]))


def test_modes_rows_flatten_into_the_csv(tmp_path: Path) -> None:
    row: dict[str, Any] = {
        "load": "rate=10/s (poisson)",
        "statuses": {"200": 9, "429": 1},
        "unsent": 0,
        "server": {},
        "modes": {
            "refused_by_type": {"predicted_late": 1},
            "by_priority": {"high": {"p99_ms": 3.0, "statuses": {"200": 2}}},
        },
    }
    report.write([row], tmp_path, "steps")
    header = (tmp_path / "steps.csv").read_text().splitlines()[0]
    assert "modes_by_priority_high_p99_ms" in header and "modes_refused_by_type_predicted_late" in header
    assert json.loads((tmp_path / "steps.json").read_text())[0]["modes"] == row["modes"]


def test_classify_bodies_carry_the_text_batcher_builds() -> None:
    assert classify_request({"turns": [{"speaker": "user", "text": "播放周杰伦的歌"}]}) == {
        "input": ["用户：播放周杰伦的歌"]
    }
    turns = [{"speaker": "user", "text": "把灯打开"}, {"speaker": "assistant", "text": "好的"}, {"text": "再暗一点"}]
    assert classify_request({"turns": turns}) == {"input": ["用户：把灯打开[SEP]助手：好的[SEP]用户：再暗一点"]}
    first = json.loads(next(Corpus(DEFAULT_CORPUS, seed=1).bodies("classify")))
    assert list(first) == ["input"] and first["input"][0].startswith("用户：")
