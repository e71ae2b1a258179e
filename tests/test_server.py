"""batcher.server: SIGHUP's reload keeps the old version serving whatever the bundle on disk
has become (truncated, or gone), says so once in the log and counts it."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import pytest

from batcher.errors import BundleError
from batcher.metrics import Metrics
from batcher.runtime import Models
from batcher.server import Shutdown
from tests.processes import finish, start, wait_ready


class Runtime:
    def __init__(self, name: str) -> None:
        self.name = name
        self.version = "v1"


class ReloadingModels:
    """What Shutdown.reload asks of Models: one model's bundle gone, the other's unchanged."""

    def __init__(self) -> None:
        self.runtimes = {name: Runtime(name) for name in ("gone", "kept")}

    def loaded(self) -> list[Runtime]:
        return list(self.runtimes.values())

    def find(self, name: str) -> Runtime | None:
        return self.runtimes.get(name)

    async def reload(self, name: str) -> dict[str, object]:
        if name == "gone":
            raise BundleError("model bundle /models/gone is not a directory")
        return {"model": name, "status": "unchanged", "version": "v1"}


def reloads(metrics: Metrics, model: str, result: str) -> float:
    value = metrics.registry.get_sample_value("batcher_model_reloads_total", {"model": model, "result": result})
    return value or 0.0


async def test_a_reload_that_raises_fails_that_model_only_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics(process=False)
    shutdown = Shutdown(cast(Models, ReloadingModels()), metrics)
    await shutdown.reload()  # no exception escapes into the signal's task
    assert reloads(metrics, "gone", "failed") == 1 and reloads(metrics, "kept", "unchanged") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        "reloading model gone failed; version v1 keeps serving: model bundle /models/gone is not a directory"
    ]


def post(url: str) -> tuple[int, str]:
    body = json.dumps({"turns": [{"speaker": "user", "text": "播放周杰伦的歌"}]}).encode()
    request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers["x-model-version"]


def failed_reloads(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("batcher_model_reloads_total{") and 'result="failed"' in line:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def sighup_until_counted(process: Any, url: str, failures: float) -> None:
    process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while failed_reloads(url) < failures:
        assert time.monotonic() < deadline, "the failed reload was not counted"
        time.sleep(0.1)


def test_a_truncated_then_removed_bundle_keeps_the_old_version_serving(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "intent-zh"))
    process, url = start(bundle)
    wait_ready(process, url)
    try:
        status, version = post(url)
        graph = bundle / "model.onnx"
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
        sighup_until_counted(process, url, 1)
        assert post(url) == (200, version)
        shutil.rmtree(bundle)
        sighup_until_counted(process, url, 2)
        assert post(url) == (200, version)
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 30)
    assert status == 200 and code == 0 and "Traceback" not in output, output
    assert output.count(f"reloading model intent-zh failed; version {version} keeps serving") == 2, output
