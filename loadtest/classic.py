"""The users' old test script, kept in spirit: one request; several cases 20 runs each
(mean and standard deviation); 10 concurrent requests (QPS)."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp

CASES = [
    [{"speaker": "user", "text": "我们有空一起去看风景好不好"}],
    [{"speaker": "user", "text": "播放周杰伦的歌"}],
    [{"speaker": "user", "text": "明天北京会下雨吗"}],
    [{"speaker": "user", "text": "明早七点叫我起床"}],
    [
        {"speaker": "user", "text": "把客厅的灯打开"},
        {"speaker": "assistant", "text": "客厅灯已打开"},
        {"speaker": "user", "text": "再调暗一点"},
    ],
]
RUNS = 20
CONCURRENT = 10


async def _post(session: aiohttp.ClientSession, url: str, turns: list[dict[str, str]]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    async with session.post(url, json={"turns": turns}) as response:
        body = await response.json()
        if response.status != 200:
            raise SystemExit(f"classic: {url} answered {response.status}: {body}")
    return (time.perf_counter() - started) * 1000, body


async def run_classic(base_url: str) -> int:
    url = base_url + "/predict"
    async with aiohttp.ClientSession() as session:
        print("1. single request")
        elapsed, body = await _post(session, url, CASES[0])
        print(
            f"   {CASES[0][0]['text']} -> {body['intent_name']} ({body['confidence']:.3f}), "
            f"inference {body['inference_time_ms']:.2f} ms, total {elapsed:.2f} ms"
        )
        print(f"2. each case {RUNS} runs")
        for turns in CASES:
            totals, inference = [], []
            for _ in range(RUNS):
                elapsed, body = await _post(session, url, turns)
                totals.append(elapsed)
                inference.append(body["inference_time_ms"])
            print(
                f"   {turns[-1]['text']:<16} -> {body['intent_name']:<8} total {statistics.mean(totals):6.2f} "
                f"± {statistics.stdev(totals):5.2f} ms, inference {statistics.mean(inference):5.2f} "
                f"± {statistics.stdev(inference):5.2f} ms"
            )
        print(f"3. {CONCURRENT} concurrent requests")
        started = time.perf_counter()
        results = await asyncio.gather(*(_post(session, url, CASES[i % len(CASES)]) for i in range(CONCURRENT)))
        wall = time.perf_counter() - started
        latencies = [elapsed for elapsed, _ in results]
        print(
            f"   {CONCURRENT} requests in {wall * 1000:.1f} ms: QPS {CONCURRENT / wall:.1f}, "
            f"mean latency {statistics.mean(latencies):.2f} ms, max {max(latencies):.2f} ms"
        )
    return 0
