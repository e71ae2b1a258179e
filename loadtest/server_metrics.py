"""Server-side breakdown of one load step, from batcher's /metrics read before and after it."""

from __future__ import annotations

import math
import os
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    """All samples of `url` (a /metrics page), or nothing if the server has none."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as response:
            if response.status != 200:
                return {}
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def grown(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much a sample grew, summed over every series of `name` that has `labels` (over
    all models, when a server serves several)."""
    wanted = set(labels.items())
    total = 0.0
    for key, value in after.items():
        if key[0] == name and wanted <= set(key[1]):
            total += value - before.get(key, 0.0)
    return total


def _buckets(before: Samples, after: Samples, name: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count delta) of a histogram summed over its series, by bound."""
    by_bound: dict[float, float] = {}
    for (sample, labels), value in after.items():
        if sample == f"{name}_bucket":
            bound = float(dict(labels)["le"])
            by_bound[bound] = by_bound.get(bound, 0.0) + value - before.get((sample, labels), 0.0)
    return sorted(by_bound.items())


def _quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the bucket holding quantile q (what histogram_quantile bounds)."""
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    for bound, cumulative in buckets:
        if cumulative >= q * total:
            return bound
    return math.inf


def breakdown(before: Samples, after: Samples, wall_s: float) -> dict[str, object]:
    """Batch sizes, queue wait vs inference, padding, rejections and CPU over one step."""
    if not any(name.startswith("batcher_") for name, _ in after):
        return {}
    batches = grown(before, after, "batcher_batch_size_count")
    rows = grown(before, after, "batcher_batch_size_sum")
    requests = grown(before, after, "batcher_queue_wait_seconds_count")
    size_buckets = _buckets(before, after, "batcher_batch_size")
    distribution: dict[str, float] = {}
    previous = 0.0
    for bound, cumulative in size_buckets:
        if cumulative - previous:
            distribution[f"le{bound:g}"] = cumulative - previous
        previous = cumulative
    real = grown(before, after, "batcher_batch_tokens_total", kind="real")
    padding = grown(before, after, "batcher_batch_tokens_total", kind="padding")
    queue_buckets = _buckets(before, after, "batcher_queue_wait_seconds")
    inference_buckets = _buckets(before, after, "batcher_inference_duration_seconds")

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    loop_cpu = grown(before, after, "batcher_event_loop_cpu_seconds_total")
    hits = grown(before, after, "batcher_cache_requests_total", result="hit")
    misses = grown(before, after, "batcher_cache_requests_total", result="miss")
    return {
        "batches": batches,
        "mean_batch_size": round(rows / batches, 2) if batches else None,
        "batch_size_distribution": distribution,
        "queue_wait_mean_ms": ms(grown(before, after, "batcher_queue_wait_seconds_sum") / requests)
        if requests
        else None,
        "queue_wait_p50_ms_le": ms(_quantile(queue_buckets, 0.5)),
        "queue_wait_p99_ms_le": ms(_quantile(queue_buckets, 0.99)),
        "inference_mean_ms": ms(grown(before, after, "batcher_inference_duration_seconds_sum") / batches)
        if batches
        else None,
        "inference_p99_ms_le": ms(_quantile(inference_buckets, 0.99)),
        "padding_ratio": round(padding / (real + padding), 3) if real + padding else None,
        "model_busy_share": round(grown(before, after, "batcher_model_busy_seconds_total") / wall_s, 3),
        "rejected": {
            reason: grown(before, after, "batcher_rejected_total", reason=reason)
            for reason in ("queue_full", "deadline", "disconnected", "invalid", "model_error", "not_ready")
        },
        "cache_hit_ratio": round(hits / (hits + misses), 3) if hits + misses else None,
        "server_cpu_share": round(grown(before, after, "process_cpu_seconds_total") / wall_s, 3),
        "event_loop_cpu_share": round(loop_cpu / wall_s, 3),
        "event_loop_cpu_us_per_request": round(loop_cpu / requests * 1e6, 1) if requests else None,
    }


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its live descendants (threads included), from
    /proc: what a server made of several processes (mosec, Triton) costs in all."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # exited meanwhile
    return total
