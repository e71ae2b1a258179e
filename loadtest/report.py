"""Terminal table, JSON and CSV per step, and PNG plots for a run of load steps."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

COLUMNS = (
    ("load", "load"),
    ("throughput_rps", "req/s"),
    ("goodput_rps", "good/s"),
    ("p50_ms", "p50 ms"),
    ("p90_ms", "p90 ms"),
    ("p99_ms", "p99 ms"),
    ("p999_ms", "p99.9 ms"),
    ("max_ms", "max ms"),
)
SERVER_COLUMNS = (
    ("mean_batch_size", "batch"),
    ("queue_wait_mean_ms", "queue ms"),
    ("inference_mean_ms", "infer ms"),
    ("model_busy_share", "busy"),
    ("padding_ratio", "pad"),
)


def table(rows: Sequence[dict[str, Any]]) -> str:
    headers = [title for _, title in COLUMNS] + ["errors"] + [title for _, title in SERVER_COLUMNS] + ["client cpu"]
    lines = []
    for row in rows:
        errors = sum(v for k, v in row["statuses"].items() if k != "200") + row["unsent"]
        server = row.get("server") or {}
        cells = [_fmt(row[key]) for key, _ in COLUMNS] + [str(errors)]
        cells += [_fmt(server.get(key)) for key, _ in SERVER_COLUMNS] + [f"{row['client_cpu_share']:.0%}"]
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    out = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def modes_table(rows: Sequence[dict[str, Any]]) -> str:
    """What each step counted for its modes (loadtest/modes.py): by priority, against the
    deadline, 429s by error type, and the retry mode's 200s and probe."""
    out: list[str] = []
    for row in rows:
        modes = row.get("modes")
        if not modes:
            continue
        out.append(f"{row['load']}:")
        if "by_priority" in modes:
            headers = ["priority", "share", "requests", "ok/s", "429s", "p50 ms", "p99 ms", "p99.9 ms", "max ms"]
            headers.append("200s p99 ms")
            cells = []
            for name, stats in modes["by_priority"].items():
                share = modes["priority_mix"].get(name)
                cells.append(
                    [name, "-" if share is None else f"{share:g}", str(stats["requests"]), _fmt(stats["ok_rps"])]
                    + [str(stats["statuses"].get("429", 0))]
                    + [_fmt(stats[key]) for key in ("p50_ms", "p99_ms", "p999_ms", "max_ms", "ok_p99_ms")]
                )
            widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
            out.append("  " + "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
            out += ["  " + "  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
        if "deadline" in modes:
            d = modes["deadline"]
            how = "sent as x-deadline-ms" if d["sent"] else "judged only, not sent"
            server = f", {d['server_late_200']} past it server-side" if d["sent"] else ""
            out.append(
                f"  deadline {d['judged_ms']:g} ms ({how}): {d['within']} answers within it "
                f"({d['goodput_rps']:.1f}/s goodput), {d['late_200']} 200s past it client-side{server}"
            )
        refused = ", ".join(f"{kind} {count}" for kind, count in modes["refused_by_type"].items()) or "none"
        out.append(
            f"  429s by type: {refused}; answered within {modes['admission_ms']:g} ms of sending: "
            f"{modes['refused_at_door']}"
        )
        if modes["errors_by_type"]:
            out.append("  other errors: " + ", ".join(f"{k} {v}" for k, v in modes["errors_by_type"].items()))
        if "retry" in modes:
            r = modes["retry"]
            waits = (
                f", {r['polite_waits']} waits of {_fmt(r['polite_wait_mean_ms'])} ms mean" if r["polite_waits"] else ""
            )
            out.append(f"  retry {r['mode']}: {r['ok_rps']:.1f} 200s/s{waits}")
            probe = r.get("probe")
            if probe:
                statuses = ", ".join(f"{k} {v}" for k, v in probe["statuses"].items())
                out.append(
                    f"  probe, a new connection every {probe['interval_ms']:g} ms: {probe['requests']} requests "
                    f"({statuses}), p50 {_fmt(probe['p50_ms'])} ms, p99 {_fmt(probe['p99_ms'])} ms, "
                    f"max {_fmt(probe['max_ms'])} ms"
                )
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    return str(value)


def write(rows: Sequence[dict[str, Any]], out: Path, name: str) -> None:
    """`name`.json (everything) and `name`.csv (flat columns) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(list(rows), indent=1, ensure_ascii=False) + "\n")
    flat = []
    for row in rows:
        item = {k: v for k, v in row.items() if k not in ("server", "statuses", "modes")}
        item.update({f"status_{k}": v for k, v in row["statuses"].items()})
        item.update({f"server_{k}": v for k, v in (row.get("server") or {}).items() if not isinstance(v, dict)})
        if "modes" in row:
            item.update(_flat("modes", row["modes"]))
        flat.append(item)
    fields = list(dict.fromkeys(key for item in flat for key in item))
    with (out / f"{name}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """Scalar leaves of nested dicts, keys joined by `_` (modes_by_priority_high_p99_ms)."""
    if isinstance(value, dict):
        found: dict[str, Any] = {}
        for key, inner in value.items():
            found.update(_flat(f"{prefix}_{key}", inner))
        return found
    return {prefix: value}


def plot_latency(series: dict[str, Sequence[dict[str, Any]]], path: Path, title: str) -> None:
    """Latency percentiles against achieved throughput, one line set per server."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for index, (name, rows) in enumerate(series.items()):
        rows = sorted(rows, key=lambda r: r["throughput_rps"])
        x = [r["throughput_rps"] for r in rows]
        color = f"C{index}"
        axes.plot(x, [r["p99_ms"] for r in rows], "-o", color=color, label=f"{name} p99", markersize=3)
        axes.plot(x, [r["p50_ms"] for r in rows], "--", color=color, label=f"{name} p50", alpha=0.7)
    axes.set_yscale("log")
    axes.set_xlabel("achieved throughput (requests/s)")
    axes.set_ylabel("latency (ms, log)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_batch_sizes(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Distribution of batch sizes (by histogram bucket) for each step."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4))
    buckets = sorted(
        {k for r in rows for k in (r.get("server") or {}).get("batch_size_distribution", {})},
        key=lambda k: float(k[2:]),
    )
    width = 0.8 / max(1, len(rows))
    for index, row in enumerate(rows):
        distribution = (row.get("server") or {}).get("batch_size_distribution", {})
        total = sum(distribution.values()) or 1
        axes.bar(
            [i + index * width for i in range(len(buckets))],
            [distribution.get(b, 0) / total for b in buckets],
            width=width,
            label=row["load"],
        )
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(buckets))], [b.replace("le", "≤") for b in buckets])
    axes.set_xlabel("batch size (histogram bucket)")
    axes.set_ylabel("share of batches")
    axes.set_title(title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
