"""The load generator against a real batcher app (tiny real model) on loopback."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from batcher.application import create_app
from batcher.metrics import Metrics
from bench.baselines.naive_server import ONNXPredictor, Turn
from loadtest import report
from loadtest.__main__ import build_parser, parse_loads
from loadtest.corpus import DEFAULT_CORPUS, Corpus
from loadtest.driver import Load
from loadtest.server_metrics import breakdown
from loadtest.steps import highest_within_slo, run_steps
from tests.conftest import MakeSettings


async def serve(aiohttp_server: Any, make_settings: MakeSettings) -> str:
    server: TestServer = await aiohttp_server(create_app(make_settings(), metrics=Metrics()))
    return str(server.make_url("")).rstrip("/")


def corpus() -> Corpus:
    return Corpus(DEFAULT_CORPUS, seed=3)


def test_default_corpus_is_the_test_split_with_multi_turn() -> None:
    bodies = corpus()
    assert len(bodies.dialogues) >= 300
    assert bodies.multi_turn_share >= 0.15  # 89 of the split's 542 dialogues
    first = json.loads(next(bodies.bodies("predict")))
    assert set(first) == {"turns"}
    assert len(json.loads(next(Corpus(DEFAULT_CORPUS, batch_items=5).bodies("batch")))["items"]) == 5


async def test_closed_loop_step_with_server_breakdown(aiohttp_server: Any, make_settings: MakeSettings) -> None:
    url = await serve(aiohttp_server, make_settings)
    rows = await run_steps(url, [Load("closed", 8)], corpus=corpus(), duration_s=1.0, warmup_s=0.3, progress=False)
    row = rows[0]
    assert row["statuses"] == {"200": row["requests"]} and row["requests"] > 20
    assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["throughput_rps"] == row["goodput_rps"]
    server = row["server"]
    assert server["mean_batch_size"] >= 1
    assert abs(server["batches"] * server["mean_batch_size"] - row["requests"]) <= 8  # in flight at the edges
    assert 0 <= server["padding_ratio"] < 1
    assert server["rejected"]["queue_full"] == 0
    assert server["event_loop_cpu_us_per_request"] > 0


async def test_open_loop_sends_on_schedule(aiohttp_server: Any, make_settings: MakeSettings) -> None:
    url = await serve(aiohttp_server, make_settings)
    rows = await run_steps(
        url, [Load("open", 100, "constant")], corpus=corpus(), duration_s=1.0, warmup_s=0, progress=False
    )
    assert 90 <= rows[0]["requests"] <= 101
    assert rows[0]["unsent"] == 0


async def test_batch_endpoint_and_errors_are_counted(
    aiohttp_server: Any, make_settings: MakeSettings, tmp_path: Path
) -> None:
    url = await serve(aiohttp_server, make_settings)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": []}\n{"turns": [{"text": "播放周杰伦的歌"}]}\n')
    rows = await run_steps(url, [Load("closed", 2)], corpus=Corpus(bad), duration_s=0.5, warmup_s=0, progress=False)
    assert set(rows[0]["statuses"]) == {"200", "422"}
    assert rows[0]["server"]["rejected"]["invalid"] == rows[0]["statuses"]["422"]
    assert rows[0]["goodput_rps"] < rows[0]["throughput_rps"]
    batch = await run_steps(
        url,
        [Load("closed", 2)],
        corpus=Corpus(DEFAULT_CORPUS, batch_items=4),
        endpoint="batch",
        duration_s=0.5,
        warmup_s=0,
        progress=False,
    )
    assert set(batch[0]["statuses"]) == {"200"}


async def test_sweep_stops_at_the_slo(aiohttp_server: Any, make_settings: MakeSettings) -> None:
    url = await serve(aiohttp_server, make_settings)
    loads = [Load("open", 50), Load("open", 60)]
    rows = await run_steps(url, loads, corpus=corpus(), duration_s=0.4, warmup_s=0, slo_p99_ms=0.001, progress=False)
    assert len(rows) == 1  # the first step already broke a 1 µs SLO
    assert highest_within_slo(rows, 0.001) is None
    assert highest_within_slo(rows, 10_000) == rows[0]


def test_cli_parses_sweeps() -> None:
    args = build_parser().parse_args(["run", "--sweep", "rate=10,20", "--arrival", "constant"])
    assert [(load.mode, load.value, load.arrival) for load in parse_loads(args)] == [
        ("open", 10, "constant"),
        ("open", 20, "constant"),
    ]
    assert parse_loads(build_parser().parse_args(["run", "--concurrency", "3"]))[0].label == "concurrency=3"


def test_breakdown_of_synthetic_samples() -> None:
    def h(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return (name, tuple(sorted(labels.items())))

    before = {h("batcher_batch_size_count"): 10.0, h("batcher_batch_size_sum"): 20.0}
    after = {
        h("batcher_batch_size_count"): 20.0,
        h("batcher_batch_size_sum"): 100.0,
        h("batcher_batch_size_bucket", le="4.0"): 2.0,
        h("batcher_batch_size_bucket", le="8.0"): 20.0,
        h("batcher_queue_wait_seconds_count"): 80.0,
        h("batcher_queue_wait_seconds_sum"): 0.4,
        h("batcher_model_busy_seconds_total"): 1.5,
        h("batcher_batch_tokens_total", kind="real"): 300.0,
        h("batcher_batch_tokens_total", kind="padding"): 100.0,
    }
    result = breakdown(before, after, wall_s=2.0)
    assert result["mean_batch_size"] == 8.0
    assert result["queue_wait_mean_ms"] == 5.0
    assert result["model_busy_share"] == 0.75
    assert result["padding_ratio"] == 0.25
    assert result["batch_size_distribution"] == {"le4": 2.0, "le8": 18.0}
    assert breakdown({}, {("other_metric", ()): 1.0}, 1.0) == {}


def test_report_writes_json_csv_and_plots(tmp_path: Path) -> None:
    row = {
        "load": "concurrency=1",
        "mode": "closed",
        "target": 1,
        "throughput_rps": 10.0,
        "goodput_rps": 10.0,
        "p50_ms": 1.0,
        "p90_ms": 2.0,
        "p99_ms": 3.0,
        "p999_ms": 4.0,
        "max_ms": 5.0,
        "statuses": {"200": 10},
        "unsent": 0,
        "late": 0,
        "client_cpu_share": 0.1,
        "server": {"mean_batch_size": 1.0, "batch_size_distribution": {"le1": 10.0}},
    }
    assert "concurrency=1" in report.table([row])
    report.write([row], tmp_path, "steps")
    assert json.loads((tmp_path / "steps.json").read_text())[0]["p99_ms"] == 3.0
    assert "status_200" in (tmp_path / "steps.csv").read_text()
    report.plot_latency({"s": [row]}, tmp_path / "latency.png", "t")
    report.plot_batch_sizes([row], tmp_path / "batches.png", "t")
    assert (tmp_path / "latency.png").stat().st_size > 1000 and (tmp_path / "batches.png").stat().st_size > 1000


def test_naive_baseline_pads_to_128_or_not_and_agrees(tiny_bundle: Path) -> None:
    padded = ONNXPredictor(tiny_bundle, 128, "max", threads=1)
    dynamic = ONNXPredictor(tiny_bundle, 128, "dynamic", threads=1)
    turns = [Turn(text="播放周杰伦的歌")]
    assert len(padded.tokenizer.encode("播放").ids) == 128
    assert len(dynamic.tokenizer.encode("播放").ids) == 4
    a, b = padded.predict(turns, True), dynamic.predict(turns, True)
    assert a["intent_id"] == b["intent_id"]
    assert a["probabilities"] == b["probabilities"]


def test_zipf_replay_repeats_the_head_of_the_corpus() -> None:
    corpus = Corpus(DEFAULT_CORPUS, seed=3, zipf=1.1)
    sequence = corpus.sequence()
    counts = Counter(json.dumps(d, sort_keys=True) for d in sequence)
    top = counts.most_common(1)[0][1] / len(sequence)
    weights = [1 / rank**1.1 for rank in range(1, len(corpus.dialogues) + 1)]
    assert top == pytest.approx(weights[0] / sum(weights), rel=0.1)
    assert counts.most_common()[-1][1] * 50 < counts.most_common(1)[0][1]  # the tail is drawn rarely


def test_oip_bodies_carry_one_dialogue_as_text() -> None:
    corpus = Corpus(DEFAULT_CORPUS, seed=1)
    bodies = corpus.bodies("oip")
    for dialogue in corpus.dialogues[:50]:
        body = json.loads(next(bodies))
        text = body["inputs"][0]["data"][0]
        turns = dialogue["turns"]
        assert text == turns[0]["text"] if len(turns) == 1 else json.loads(text)["turns"] == turns
