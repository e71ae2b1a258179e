"""Several models in one server, hot reload, the response cache and the prediction log,
against a real aiohttp server on loopback with tiny real ONNX models (FakeModel only where
the point is whether the model ran)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from batcher.config import ModelSettings
from batcher.handlers import MODELS
from batcher.metrics import Metrics
from batcher.model.bundle import bundle_version
from batcher.runtime import settings_key
from loadtest.driver import Driver, Load
from loadtest.http import HttpClient
from tests.conftest import FakeModel, MakeClient, metric
from tests.processes import ROOT, finish, start, wait_ready
from tests.tiny_model import build_bundle

ONE = {"turns": [{"speaker": "user", "text": "播放周杰伦的歌"}]}
OTHER = {"turns": [{"speaker": "user", "text": "明天天气怎么样"}]}


def version_of(bundle: Path) -> str:
    """The version a bundle served with default model settings has."""
    return bundle_version(bundle, "model.onnx", settings_key(ModelSettings()))


@pytest.fixture(scope="module")
def wide_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model with other weights: another version of the same bundle shape."""
    return build_bundle(tmp_path_factory.mktemp("wide"), hidden=24)


@pytest.fixture
def reloadable(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A copy of the tiny bundle whose files a test may swap on disk."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "intent-zh"))


class Session:
    """A few blocking JSON requests (the e2e tests here are synchronous around a process)."""

    def post(self, url: str, *, json: Any) -> Reply:
        return self._send(urllib.request.Request(url, data=_dumps(json), headers={"Content-Type": "application/json"}))

    def get(self, url: str) -> Reply:
        return self._send(urllib.request.Request(url))

    @staticmethod
    def _send(request: urllib.request.Request) -> Reply:
        with urllib.request.urlopen(request, timeout=30) as response:
            return Reply(response.status, dict(response.headers), response.read())


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def _dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


@contextlib.contextmanager
def blocking_session() -> Iterator[Session]:
    yield Session()


async def error_of(response: Any, status: int) -> dict[str, str]:
    assert response.status == status, await response.text()
    return (await response.json())["error"]  # type: ignore[no-any-return]


async def test_two_models_answer_on_their_routes_and_the_default_on_predict(
    make_client: MakeClient, tiny_bundle: Path, wide_bundle: Path
) -> None:
    metrics = Metrics(process=False)
    client = await make_client(
        f'models.wide.path="{wide_bundle}"', "models.wide.batching.max_batch_size=4", metrics=metrics
    )
    default = await client.post("/predict", json=ONE)
    named = await client.post("/models/intent-zh/predict", json=ONE)
    wide = await client.post("/models/wide/predict", json=ONE)
    assert [r.status for r in (default, named, wide)] == [200, 200, 200]
    assert default.headers["x-model-version"] == named.headers["x-model-version"] == version_of(tiny_bundle)
    assert wide.headers["x-model-version"] == version_of(wide_bundle)
    batch = await client.post("/models/wide/predict/batch", json={"items": [ONE, OTHER]})
    assert batch.status == 200 and len((await batch.json())["results"]) == 2
    listed = await (await client.get("/models")).json()
    assert listed["default"] == "intent-zh"
    assert [(m["name"], m["ready"]) for m in listed["models"]] == [("intent-zh", True), ("wide", True)]
    assert (await (await client.get("/models/wide/intents")).json())["intents"][0]["id"] == 0
    assert metric(metrics, "batcher_batch_size_sum") == 2  # /predict and /models/intent-zh/predict
    assert metric(metrics, "batcher_batch_size_sum", model="wide") == 3
    assert metric(metrics, "batcher_queue_capacity", model="wide") == 256
    for path in ("/models/nope/predict", "/models/nope/intents"):
        assert (
            await error_of(await client.post(path, json=ONE) if "predict" in path else await client.get(path), 404)
        )["type"] == "model_not_found"


async def test_reload_swaps_in_a_new_version_and_keeps_the_old_one_when_the_new_one_is_broken(
    make_client: MakeClient, reloadable: Path, wide_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(process=False)
    client = await make_client(f'model.path="{reloadable}"', "server.admin_enabled=true", metrics=metrics)
    first = (await client.post("/predict", json=ONE)).headers["x-model-version"]
    unchanged = await (await client.post("/models/intent-zh/reload")).json()
    assert unchanged == {"model": "intent-zh", "status": "unchanged", "version": first}
    shutil.copy(wide_bundle / "model.onnx", reloadable / "model.onnx")
    reloaded = await (await client.post("/models/intent-zh/reload")).json()
    assert reloaded["status"] == "reloaded" and reloaded["previous"] == first
    second = reloaded["version"]
    assert second == version_of(reloadable) != first
    assert (await client.post("/predict", json=ONE)).headers["x-model-version"] == second
    assert (await (await client.get("/models")).json())["models"][0]["version"] == second
    info = [s for f in metrics.registry.collect() if f.name == "batcher_model_info" for s in f.samples]
    assert [s.labels["version"] for s in info] == [second]  # the old version's series is gone
    (reloadable / "model.onnx").write_bytes(b"not an onnx graph")
    failed = await client.post("/models/intent-zh/reload")
    body = await failed.json()
    assert failed.status == 500 and body["error"]["type"] == "reload_failed" and body["version"] == second
    assert "ONNX Runtime cannot load it" in body["error"]["message"]
    still = await client.post("/predict", json=ONE)
    assert still.status == 200 and still.headers["x-model-version"] == second
    assert any("reloading model intent-zh failed" in r.getMessage() for r in caplog.records)
    shutil.rmtree(reloadable)  # the bundle removed on disk: the same answer, not a 500 with a traceback
    gone = await client.post("/models/intent-zh/reload")
    assert gone.status == 500 and (await gone.json())["error"]["type"] == "reload_failed"
    assert (await client.post("/predict", json=ONE)).headers["x-model-version"] == second


async def test_reload_is_not_served_unless_admin_is_enabled(make_client: MakeClient) -> None:
    client = await make_client()
    assert (await error_of(await client.post("/models/intent-zh/reload"), 404))["type"] == "not_found"


async def test_reload_needs_a_bearer_token_when_tokens_are_set(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_TOKENS", "secret")
    client = await make_client("server.admin_enabled=true", 'server.auth_tokens_env="TEST_TOKENS"')
    assert (await error_of(await client.post("/models/intent-zh/reload"), 401))["type"] == "unauthorized"
    allowed = await client.post("/models/intent-zh/reload", headers={"Authorization": "Bearer secret"})
    assert allowed.status == 200


async def test_a_repeated_dialogue_is_answered_from_the_cache_without_a_model_run(make_client: MakeClient) -> None:
    model = FakeModel()  # the point: whether the model ran
    metrics = Metrics(process=False)
    client = await make_client("cache.max_entries=2", model=model, metrics=metrics)
    model.armed = True
    first = await (await client.post("/predict", json=ONE)).json()
    again = await (await client.post("/predict", json=ONE)).json()
    assert model.rows == 1
    assert "cached" not in first["timing"] and again["timing"]["cached"] is True
    assert again["timing"]["batch_size"] == 0 and again["intent_id"] == first["intent_id"]
    assert metric(metrics, "batcher_cache_requests_total", result="hit") == 1
    assert metric(metrics, "batcher_cache_requests_total", result="miss") == 1
    third = {"turns": [{"text": "把客厅的灯关掉"}]}
    batch = await (await client.post("/predict/batch", json={"items": [OTHER, third, ONE]})).json()
    assert [r["timing"].get("cached", False) for r in batch["results"]] == [False, False, True]
    assert model.rows == 3  # the two new ones ran, together
    await client.post("/predict", json=ONE)  # evicted by the two newer entries (max_entries = 2)
    assert model.rows == 4


async def test_every_answered_prediction_is_logged_once_without_text_unless_asked(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batcher.predictions")
    client = await make_client("log.predictions=1.0")
    response = await client.post("/predict", json=ONE, headers={"x-request-id": "req-1"})
    await client.post("/predict/batch", json={"items": [ONE, OTHER]}, headers={"x-request-id": "req-2"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "batcher.predictions"]
    assert [line["request_id"] for line in lines] == ["req-1", "req-2", "req-2"]
    assert lines[0]["version"] == response.headers["x-model-version"] and lines[0]["model"] == "intent-zh"
    assert set(lines[0]) >= {"time", "intent", "confidence", "batch_size", "queue_ms", "inference_ms"}
    assert all("turns" not in line for line in lines)
    caplog.clear()
    with_text = await make_client("log.predictions=1.0", "log.prediction_text=true")
    await with_text.post("/predict", json=ONE)
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "batcher.predictions"]
    assert logged[0]["turns"] == ONE["turns"]


async def test_sampling_logs_about_that_share(make_client: MakeClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="batcher.predictions")
    client = await make_client("log.predictions=0.25")
    await asyncio.gather(*(client.post("/predict", json=ONE) for _ in range(400)))
    logged = sum(r.name == "batcher.predictions" for r in caplog.records)
    assert 50 < logged < 150  # 100 expected


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "INT64", "data": [1]}]}, 400, "BYTES"),
        ({"inputs": [{"name": "text", "shape": [2, 2], "datatype": "BYTES", "data": ["a"] * 4}]}, 400, "[N] or [N, 1]"),
        ({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}, 400, "2 strings"),
        ({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["  "]}]}, 400, "non-blank"),
        ({"inputs": []}, 400, "exactly one input"),
        (
            {"inputs": [{"name": "text", "shape": [65], "datatype": "BYTES", "data": ["a"] * 65}]},
            413,
            "max_batch_items",
        ),
    ],
)
async def test_open_inference_protocol_errors_are_in_its_shape(
    make_client: MakeClient, body: dict[str, Any], status: int, words: str
) -> None:
    client = await make_client()
    response = await client.post("/v2/models/intent-zh/infer", json=body)
    assert response.status == status
    error = (await response.json())["error"]
    assert isinstance(error, str) and words in error


async def test_open_inference_protocol_routes(make_client: MakeClient) -> None:
    client = await make_client()
    assert (await (await client.get("/v2/health/live")).json()) == {"live": True}
    assert (await (await client.get("/v2/health/ready")).json()) == {"ready": True}
    assert (await (await client.get("/v2")).json())["name"] == "batcher"
    metadata = await (await client.get("/v2/models/intent-zh")).json()
    assert metadata["inputs"][0]["name"] == "text" and metadata["outputs"][2]["name"] == "intent_name"
    assert (await client.get("/v2/models/intent-zh/ready")).status == 200
    missing = await client.get("/v2/models/nope")
    assert missing.status == 404 and "model_not_found" in (await missing.json())["error"]
    request = {
        "id": "r1",
        "inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES", "data": [["播放"], ["你好"]]}],
    }
    answer = await (await client.post("/v2/models/intent-zh/infer", json=request)).json()
    assert answer["id"] == "r1" and answer["model_name"] == "intent-zh"
    outputs = {output["name"]: output for output in answer["outputs"]}
    assert outputs["probabilities"]["shape"] == [2, 4] and len(outputs["probabilities"]["data"]) == 8
    assert outputs["intent_id"]["datatype"] == "INT64" and len(outputs["intent_name"]["data"]) == 2
    assert client.app[MODELS].find() is not None


def test_tritonclient_gets_the_intents_predict_gives_for_the_test_split(tmp_path: Path) -> None:
    """The real Open Inference Protocol client (tritonclient[http], its binary tensor
    extension included) against app.py serving the bundled model, over the whole test split."""
    import numpy as np
    import tritonclient.http as triton

    dialogues = [json.loads(line) for line in (ROOT / "data" / "intents" / "test.jsonl").read_text().splitlines()]
    process, url = start(ROOT / "models" / "intent-zh", config=ROOT / "config.toml")
    wait_ready(process, url, timeout_s=60)
    try:
        expected: list[str] = []
        with blocking_session() as session:
            for start_at in range(0, len(dialogues), 64):
                items = [{"turns": d["turns"]} for d in dialogues[start_at : start_at + 64]]
                answer = session.post(f"{url}/predict/batch", json={"items": items}).json()
                expected += [result["intent_name"] for result in answer["results"]]
        client = triton.InferenceServerClient(url=url.removeprefix("http://"))
        got: list[str] = []
        for start_at in range(0, len(dialogues), 64):
            chunk = dialogues[start_at : start_at + 64]
            texts = [
                d["turns"][0]["text"] if len(d["turns"]) == 1 else json.dumps({"turns": d["turns"]}) for d in chunk
            ]
            text = triton.InferInput("text", [len(texts)], "BYTES")
            text.set_data_from_numpy(np.array(texts, dtype=object))  # binary tensor data, as Triton's clients send
            result = client.infer("intent-zh", [text])
            got += [name.decode() if isinstance(name, bytes) else str(name) for name in result.as_numpy("intent_name")]
        assert len(got) == len(dialogues) >= 500  # the whole split, every line of it
        assert got == expected
    finally:
        process.send_signal(signal.SIGTERM)
        assert finish(process, 30)[0] == 0


def swap_graph(bundle: Path, source: Path) -> None:
    """Replace the bundle's graph the way a deploy would: write beside it, then rename."""
    staged = bundle / "model.onnx.new"
    shutil.copy(source / "model.onnx", staged)
    staged.replace(bundle / "model.onnx")


async def test_five_reloads_under_load_fail_no_request(reloadable: Path, tiny_bundle: Path, wide_bundle: Path) -> None:
    """20 s of 32 closed-loop clients; the bundle is swapped between two versions on disk
    and reloaded five times meanwhile."""
    process, url = start(reloadable, "server.admin_enabled=true")
    wait_ready(process, url)
    versions = [version_of(bundle) for bundle in (tiny_bundle, wide_bundle)]
    client = HttpClient("127.0.0.1", int(url.rsplit(":", 1)[1]))
    bodies = itertools.cycle([json.dumps(ONE).encode(), json.dumps(OTHER).encode()])
    driver = Driver(client, "/predict", bodies, seed=1, timeout_s=10, progress=False)
    load = asyncio.ensure_future(driver.run(Load("closed", 32), duration_s=20, warmup_s=0))
    seen = []
    try:
        async with aiohttp.ClientSession() as session:
            for reload in range(5):
                await asyncio.sleep(3)
                swap_graph(reloadable, wide_bundle if reload % 2 == 0 else tiny_bundle)
                async with session.post(f"{url}/models/intent-zh/reload") as response:
                    answer = await response.json()
                assert answer["status"] == "reloaded", answer
                async with session.get(f"{url}/models") as response:
                    seen.append((await response.json())["models"][0]["version"])
        result = await load
    finally:
        await client.close()
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 30)
    assert code == 0 and "Traceback" not in output, output
    assert seen == [versions[1], versions[0], versions[1], versions[0], versions[1]]
    assert set(result.statuses) == {"200"} and result.statuses["200"] > 500, result.statuses


def test_sighup_reloads_what_changed_on_disk_and_prediction_lines_go_to_their_file(
    reloadable: Path, wide_bundle: Path, tmp_path: Path
) -> None:
    lines_file = tmp_path / "predictions.jsonl"
    process, url = start(reloadable, "log.predictions=1.0", f'log.predictions_file="{lines_file}"')
    wait_ready(process, url)
    try:
        with blocking_session() as session:
            before = session.post(f"{url}/predict", json=ONE).headers["x-model-version"]
            swap_graph(reloadable, wide_bundle)
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while (after := session.get(f"{url}/models").json()["models"][0]["version"]) == before:
                assert time.monotonic() < deadline, "SIGHUP did not reload the model"
                time.sleep(0.2)
            answered = session.post(f"{url}/predict", json=ONE)
            assert answered.headers["x-model-version"] == after == version_of(reloadable)
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 30)
    assert code == 0 and "SIGHUP: model=intent-zh status=reloaded" in output, output
    lines = [json.loads(line) for line in lines_file.read_text().splitlines()]
    assert [line["version"] for line in lines] == [before, after]
    assert "batcher.predictions" not in output  # in their file, not in the server's log
