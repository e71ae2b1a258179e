"""The wheel, proved from outside the checkout: built from this tree, installed into a fresh
virtual environment in a temporary folder, and run as a user runs it, from an empty
directory with none of the checkout in sight: `batcher --version`, `batcher check` on the
bundled model, and `batcher serve` answering `/predict` until SIGTERM (exit 0).

The dependencies come through pip as a user's would (its cache after the first run), at the
versions requirements.txt pins, ONNX Runtime's CPU build at the GPU build's pinned version.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from batcher import __version__
from bench.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
WHEEL_LIMIT_BYTES = 40_000_000  # the bundled model's two graphs are ~31 MB of it before compression
ALARM = {"turns": [{"speaker": "user", "text": "明天早上七点叫我起床"}]}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `bin` folder of a fresh virtual environment with the wheel and its dependencies."""
    base = tmp_path_factory.mktemp("package")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(base / "dist"), str(ROOT)])
    [wheel] = (base / "dist").glob("batcher-*.whl")
    assert wheel.name == f"batcher-{__version__}-py3-none-any.whl"
    assert wheel.stat().st_size < WHEEL_LIMIT_BYTES, f"{wheel.name}: {wheel.stat().st_size:,} bytes"
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])  # this pip installs into it: no ensurepip
    constraints = base / "constraints.txt"
    constraints.write_text(pinned_constraints((ROOT / "requirements.txt").read_text()), encoding="utf-8")
    run(
        [
            *pip,
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--quiet",
            "--no-compile",
            "--only-binary=:all:",
            "--constraint",
            str(constraints),
            str(wheel),
        ]
    )
    return venv / "bin"


def pinned_constraints(requirements: str) -> str:
    """requirements.txt's pins as constraints, plus ONNX Runtime's CPU build at the version
    the GPU build is pinned to (the wheel depends on the CPU build)."""
    lines = [line.split("#")[0].strip() for line in requirements.splitlines()]
    pins = [line for line in lines if "==" in line]
    gpu = next(line for line in pins if line.startswith("onnxruntime-gpu=="))
    return "\n".join([*pins, gpu.replace("onnxruntime-gpu", "onnxruntime")]) + "\n"


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def outside(tmp_path: Path) -> dict[str, Any]:
    """Where a user runs the command: an empty directory, none of the checkout importable."""
    empty = tmp_path / "empty"
    empty.mkdir()
    drop = ("BATCHER_", "PYTHON", "VIRTUAL_ENV", "PROMETHEUS_MULTIPROC_DIR")
    env = {key: value for key, value in os.environ.items() if not key.startswith(drop)}
    return {"cwd": empty, "env": env}


def test_version_is_the_packages(installed: Path, outside: dict[str, Any]) -> None:
    for command in (["batcher"], ["python", "-m", "batcher"]):
        version = run([str(installed / command[0]), *command[1:], "--version"], **outside).stdout
        assert version.strip() == f"batcher {__version__}"


def test_check_loads_the_bundled_model_from_the_package(installed: Path, outside: dict[str, Any]) -> None:
    text = ALARM["turns"][0]["text"]
    output = run([str(installed / "batcher"), "check", "--text", text], **outside).stdout
    bundle = re.search(r"^bundle +(.+)$", output, re.MULTILINE)
    assert bundle is not None, output
    assert Path(bundle[1]).is_relative_to(installed.parent), output  # the wheel's copy, not the checkout's
    assert "model.int8.onnx" in output and '"intent_name":"闹钟设置"' in output


def test_serve_answers_then_drains_on_sigterm(installed: Path, outside: dict[str, Any]) -> None:
    port = free_port()
    log = outside["cwd"].parent / "serve.log"
    command = [str(installed / "batcher"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as sink:
        process = subprocess.Popen([*command, "--set", "model.warmup_runs=1"], stdout=sink, stderr=sink, **outside)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, log)
        assert get(f"{url}/v2")["version"] == get(f"{url}/")["version"] == __version__
        assert f'batcher_version="{__version__}"' in urllib.request.urlopen(f"{url}/metrics").read().decode()
        answer = post(f"{url}/predict", ALARM)
        assert answer["intent_name"] == "闹钟设置", answer
        assert get(f"{url}/models")["models"][0]["file"] == "model.int8.onnx"
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=40)
    assert code == 0, log.read_text()
    assert os.listdir(outside["cwd"]) == []  # it wrote nothing where it ran


def wait_ready(process: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"batcher serve exited early:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout_s} s:\n{log.read_text()}")


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def post(url: str, body: Any) -> Any:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
