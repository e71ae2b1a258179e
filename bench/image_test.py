"""`make image-test`: run the image `make image` built, check /readyz and POST /predict, then
stop it the way an orchestrator does (`podman stop`: SIGTERM, then SIGKILL after a grace
period) with requests in flight, and check that every request was answered, the process
drained and exited 0, as user 10001, with no traceback in its log.

    python -m bench.image_test [--image localhost/batcher:latest]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import aiohttp

from bench.servers import free_port

RUNTIME = os.environ.get("CONTAINER_RUNTIME", "podman")
# Podman's default OCI runtime (crun) refuses hybrid cgroups here; runc works (deploy/image/build.sh).
RUNTIME_FLAGS = ["--runtime", "runc"] if RUNTIME == "podman" and shutil.which("runc") else []
LIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]
DRAIN_DELAY_S = 1.0
BODY = {"turns": [{"speaker": "user", "text": "播放周杰伦的歌"}]}


def container(*args: str, check: bool = True) -> str:
    result = subprocess.run([RUNTIME, *RUNTIME_FLAGS, *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"{RUNTIME} {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def container_log(name: str) -> str:
    """The container's stdout and stderr, as the runtime relays them (on its own stdout and stderr)."""
    logs = subprocess.run([RUNTIME, *RUNTIME_FLAGS, "logs", name], capture_output=True, text=True, check=False)
    return logs.stdout + logs.stderr


async def until_ready(session: aiohttp.ClientSession, url: str, timeout_s: float = 120) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            async with session.get(f"{url}/readyz") as response:
                if response.status == 200:
                    return round(time.monotonic() - started, 1)
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("image-test: the container never became ready")


async def predict(session: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with session.post(f"{url}/predict", json=BODY) as response:
            await response.read()
            return response.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="localhost/batcher:latest", help="the image to run (default: %(default)s)")
    args = parser.parse_args()
    port = free_port()
    name = f"batcher-image-test-{port}"
    # As an orchestrator would: a drain delay, so requests still on their way through the
    # runtime's port forwarding when SIGTERM lands are admitted rather than cut there.
    settings = ["--env", f"BATCHER_SERVER__DRAIN_DELAY_S={DRAIN_DELAY_S}"]
    port_map = ["-p", f"127.0.0.1:{port}:8000"]
    container("run", "-d", "--name", name, "--log-driver", "k8s-file", *LIMITS, *settings, *port_map, args.image)
    try:
        result = asyncio.run(run(name, f"http://127.0.0.1:{port}"))
    finally:
        container("rm", "-f", name, check=False)
    print(json.dumps(result, indent=1, ensure_ascii=False))
    ok = (
        result["first"]["status"] == 200
        and result["first"]["intent_name"] == "音乐播放"
        and set(result["in_flight"]) <= {"200", "503"}
        and result["exit_code"] == 0
        and result["drained"]
        and not result["tracebacks"]
        and result["user"] == "10001:10001"
    )
    print("image-test: " + ("passed" if ok else "FAILED"), file=sys.stderr)
    sys.exit(0 if ok else 1)


async def run(name: str, url: str) -> dict[str, Any]:
    """Ready, one prediction, then 64 in flight as `stop` lands; what the container did."""
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        ready_after_s = await until_ready(session, url)
        async with session.post(f"{url}/predict", json=BODY) as response:
            first = {"status": response.status, **(await response.json())}
        in_flight = [asyncio.ensure_future(predict(session, url)) for _ in range(64)]
        await asyncio.sleep(0.05)
        stopped = time.monotonic()
        stop = loop.run_in_executor(None, container, "stop", "-t", "30", name)
        answers = await asyncio.gather(*in_flight)
        await stop
    exit_code = int(container("inspect", "--format", "{{.State.ExitCode}}", name))
    log = await loop.run_in_executor(None, container_log, name)
    return {
        "ready_after_s": ready_after_s,
        "first": first,
        "in_flight": {str(status): answers.count(status) for status in set(answers)},
        "stop_s": round(time.monotonic() - stopped, 2),
        "exit_code": exit_code,
        "drained": "stopped" in log and "SIGTERM" in log,
        "tracebacks": log.count("Traceback"),
        "user": container("inspect", "--format", "{{.Config.User}}", name),
        "log_tail": log.splitlines()[-6:],
    }


if __name__ == "__main__":
    main()
