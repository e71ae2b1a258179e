"""deploy/: promtool accepts the Prometheus config and alert rules (and their unit tests
pass), and every Grafana panel query, and the autoscalers' queries (prometheus-adapter's
rule for the HPA, KEDA's trigger), return data from a real Prometheus scraping a real
batcher under load, served by one process (the default) and by two workers. Skips, saying
why, only where the Prometheus binaries are absent, and not under CI (CI=true), which
installs them (`.ci/run`: Debian's `prometheus` package): there a missing one fails."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bench.servers import free_port
from tests.processes import ROOT, finish, start, wait_ready

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "batcher.json"
INSTANCES = 2
"""batching.instances by default: model runs in flight at once in one worker."""


def installed(name: str) -> str:
    """The path of the Prometheus binary `name`; where it is absent, a skip, or under CI a
    failure (CI installs it, so a missing one there is a broken CI, not a reason to skip)."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} not installed (apt-get install prometheus)"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{reason}, under CI")
        pytest.skip(reason)
    return path


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_is_importable_shape() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert len(dashboard["panels"]) >= 10
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"job", "instance", "model"} <= set(variables)
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


@pytest.mark.parametrize(
    "command",
    [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]],
)
def test_promtool_accepts_config_rules_and_rule_tests(command: list[str]) -> None:
    promtool = installed("promtool")
    result = subprocess.run([promtool, *command], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def start_prometheus(config: Path, storage: Path, port: int) -> subprocess.Popen[bytes]:
    args = [
        installed("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={storage}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def autoscaler_queries() -> dict[str, str]:
    """The HPA's metric as prometheus-adapter asks Prometheus for it (its template filled in
    for one scrape target), and KEDA's trigger query, both from the shipped manifests."""
    adapter = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-rules.yaml").read_text())
    rule = yaml.safe_load(adapter["data"]["config.yaml"])["rules"][0]
    keda = yaml.safe_load((DEPLOY / "k8s" / "keda-scaledobject.yaml").read_text())
    return {
        "hpa": rule["metricsQuery"].replace("<<.LabelMatchers>>", 'job="batcher"').replace("<<.GroupBy>>", "instance"),
        "keda": keda["spec"]["triggers"][0]["metadata"]["query"].replace('namespace="batcher"', 'job="batcher"'),
    }


def concrete(expr: str) -> str:
    """A panel query with Grafana's variables filled in as Grafana would for 'All'."""
    for variable, value in (("$__rate_interval", "15s"), ("$job", ".*"), ("$instance", ".*"), ("$model", ".*")):
        expr = expr.replace(variable, value)
    return expr


async def drive(url: str, stop: asyncio.Event) -> None:
    good = {"turns": [{"speaker": "user", "text": "播放周杰伦的歌"}]}
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            requests = [session.post(f"{url}/predict", json=good) for _ in range(8)]
            requests += [session.post(f"{url}/predict", data=b"{bad"), session.post(f"{url}/predict", json={})]
            requests.append(session.post(f"{url}/predict/batch", json={"items": [good, good]}))
            requests.append(session.get(f"{url}/nope"))
            for response in await asyncio.gather(*requests):
                response.release()
            await asyncio.sleep(0.05)


async def query(session: aiohttp.ClientSession, prometheus: str, expr: str) -> list[dict[str, Any]]:
    async with session.get(f"{prometheus}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "two workers"])
async def test_every_dashboard_query_returns_data_from_real_prometheus(
    tiny_bundle: Path, tmp_path: Path, workers: int
) -> None:
    installed("prometheus")
    server, url = start(tiny_bundle, f"server.workers={workers}")
    wait_ready(server, url)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{DEPLOY / 'prometheus' / 'alerts.yml'}']\n"
        "scrape_configs:\n"
        f"  - job_name: batcher\n    static_configs: [{{targets: ['{url.removeprefix('http://')}']}}]\n"
    )
    prometheus_url = f"http://127.0.0.1:{port}"
    prometheus = start_prometheus(config, tmp_path / "tsdb", port)
    stop = asyncio.Event()
    traffic = asyncio.ensure_future(drive(url, stop))
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            missing: list[str] = []
            while time.monotonic() < deadline:
                await asyncio.sleep(2)
                missing = []
                for title, expr in panel_queries():
                    try:
                        result = await query(session, prometheus_url, concrete(expr))
                    except aiohttp.ClientError:
                        result = []
                    values = [float(item["value"][1]) for item in result]
                    if not any(math.isfinite(value) for value in values):
                        missing.append(f"{title}: {expr}")
                if not missing:
                    break
            assert not missing, "queries without data:\n" + "\n".join(missing)
            # What the autoscalers act on: the busy share (0 to 1 per pod) and busy instances.
            scaling = {name: await query(session, prometheus_url, expr) for name, expr in autoscaler_queries().items()}
            busy_share = [float(item["value"][1]) for item in scaling["hpa"]]
            assert len(busy_share) == 1 and 0 < busy_share[0] <= 1, scaling
            busy_instances = float(scaling["keda"][0]["value"][1])
            assert busy_instances == pytest.approx(busy_share[0] * workers * INSTANCES, rel=0.5)
            counted = await query(session, prometheus_url, "count(batcher_worker_resident_memory_bytes)")
            assert counted and float(counted[0]["value"][1]) == workers
            async with session.get(f"{prometheus_url}/api/v1/rules") as response:
                rules = await response.json()
            assert len(rules["data"]["groups"][0]["rules"]) == 6
            async with session.get(f"{url}/metrics") as response:
                exposed = set(re.findall(r"^# TYPE (batcher_\w+) ", await response.text(), flags=re.M))
        used = " ".join(expr for _, expr in panel_queries())
        unused = {
            family for family in exposed if not re.search(rf"\b{family}(_total|_bucket|_sum|_count|_info)?\b", used)
        }
        assert not unused, f"metric families on no panel: {sorted(unused)}"
    finally:
        stop.set()
        await traffic
        prometheus.send_signal(signal.SIGTERM)
        prometheus.wait(timeout=20)
        server.send_signal(signal.SIGTERM)
        finish(server, 20)
