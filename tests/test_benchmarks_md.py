"""bench.benchmarks_md, the promises section (issue 30): each bound is judged from the run's
own figures, met only where the figures meet it, and every scenario renders."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bench.benchmarks_md import _promises_lines, promise_rows

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "results.json"


def by_priority(**priorities: dict[str, Any]) -> dict[str, Any]:
    return {"modes": {"by_priority": priorities}}


def high(p99_ms: float, requests: int = 1000, refused: int = 0) -> dict[str, Any]:
    return {"p99_ms": p99_ms, "requests": requests, "statuses": {"200": requests - refused, "429": refused}}


def answered(max_ms: float, p99_ms: float) -> dict[str, Any]:
    return {"ok_max_ms": max_ms, "ok_p99_ms": p99_ms}


def priority_round(over_ms: float, half_ms: float, low_max_ms: float = 600.0, refused: int = 0) -> dict[str, Any]:
    return {
        "half": by_priority(high=high(half_ms)),
        "over": by_priority(high=high(over_ms, refused=refused), low=answered(low_max_ms, 500.0)),
        "plain": by_priority(none=answered(300.0, 250.0)),
    }


def rps(*values: float) -> list[dict[str, Any]]:
    return [{"throughput_rps": value, "p99_ms": 40.0} for value in values]


def coalescing_rows(rows_per_request: float, req_s: float, p99_ms: float) -> list[dict[str, Any]]:
    return [
        {
            "throughput_rps": req_s,
            "p99_ms": p99_ms,
            "statuses": {"200": 1000},
            "server": {"batches": 100, "mean_batch_size": 10 * rows_per_request},
        }
    ]


def storm_row(ok_rps: float, probe_p99_ms: float | None = 30.0) -> dict[str, Any]:
    probe = None if probe_p99_ms is None else {"p99_ms": probe_p99_ms, "requests": 200}
    return {"modes": {"retry": {"ok_rps": ok_rps, "probe": probe}}}


def all_met() -> dict[str, Any]:
    """A run that meets every bound, each with some margin."""
    return {
        "priorities": {"rounds": [priority_round(28.0, 15.0), priority_round(30.0, 16.0), priority_round(25.0, 14.0)]},
        "deadlines": {
            "with": {
                "statuses": {"200": 9000, "429": 1000},
                "modes": {
                    "deadline": {"server_late_200": 0, "server_time_unknown": 0, "goodput_rps": 1200.0},
                    "refused_at_door": 980,
                },
            },
            "without": {"modes": {"deadline": {"goodput_rps": 100.0}}},
        },
        "coalescing": {
            "on": coalescing_rows(0.5, 2000.0, 40.0),
            "off": coalescing_rows(1.0, 1500.0, 45.0),
            "answers": {"differing": 0, "requests": 2000, "dialogues": 500, "copies": 4, "rows_per_request": 0.25},
        },
        "storm": {"storm": storm_row(1500.0), "polite": storm_row(1800.0)},
        "lone": {"batcher": rps(900, 850, 950), "naive": rps(800, 800, 800)},
        "ab64": {"baseline": "48bc94a", "after": rps(2000, 2100, 1950), "before": rps(2000, 2000, 2000)},
    }


def verdicts(promises: dict[str, Any]) -> list[str]:
    return [verdict for _, _, _, verdict in promise_rows(promises)]


def test_a_run_that_meets_every_bound_is_met_on_all_thirteen() -> None:
    assert verdicts(all_met()) == ["met"] * 13


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(promises: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = promises
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value

    return change


BREAKS = {
    # high's p99 at 2x over its p99 at half load, on the medians of the rounds: 2.13x
    "priorities ratio": (
        0,
        _set(
            "priorities.rounds",
            [priority_round(32.0, 15.0), priority_round(30.0, 16.0), priority_round(34.0, 14.0)],
        ),
    ),
    "high refused": (1, _set("priorities.rounds.0.over.modes.by_priority.high.statuses.429", 4)),
    "low waits": (2, _set("priorities.rounds.1.over.modes.by_priority.low.ok_max_ms", 1301.0)),
    "a late 200": (3, _set("deadlines.with.modes.deadline.server_late_200", 1)),
    "refused late": (4, _set("deadlines.with.modes.refused_at_door", 940)),
    "goodput": (5, _set("deadlines.without.modes.deadline.goodput_rps", 1201.0)),
    "rows per request": (6, _set("coalescing.on", coalescing_rows(0.71, 2000.0, 40.0))),
    "answers differ": (7, _set("coalescing.answers.differing", 1)),
    "coalescing slower": (8, _set("coalescing.on", coalescing_rows(0.5, 1450.0, 40.0))),
    "storm rate": (9, _set("storm.storm", storm_row(1259.0))),
    "storm probe": (10, _set("storm.storm", storm_row(1500.0, 101.0))),
    "no probe": (10, _set("storm.storm", storm_row(1500.0, None))),
    "lone client": (11, _set("lone.batcher", rps(900, 790, 780))),
    "64 clients slower": (12, _set("ab64.after", rps(1890, 1890, 1890))),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_each_bound_broken_alone_is_not_met_and_the_rest_still_are(name: str) -> None:
    row, change = BREAKS[name]
    promises = all_met()
    change(promises)
    found = verdicts(promises)
    assert found[row] == "**not met**"
    assert found[:row] + found[row + 1 :] == ["met"] * 12


def test_the_bounds_are_inclusive_at_their_edges() -> None:
    promises = all_met()
    promises["priorities"]["rounds"] = [priority_round(30.0, 15.0)]  # exactly 2x
    promises["lone"] = {"batcher": rps(800), "naive": rps(800)}  # exactly 1.0x
    promises["ab64"]["after"] = rps(1900, 1900, 1900)  # exactly 95 %
    assert verdicts(promises) == ["met"] * 13


def test_the_paired_bounds_take_the_median_of_the_rounds_ratios() -> None:
    """Lone client: rounds of 1.2x, 0.9x and 1.05x: the median ratio 1.05x is met, though the
    slowest round alone would not be; two rounds of three under 1.0x are not."""
    promises = all_met()
    promises["lone"] = {"batcher": rps(960, 720, 840), "naive": rps(800, 800, 800)}
    assert verdicts(promises)[11] == "met"
    promises["lone"] = {"batcher": rps(960, 720, 790), "naive": rps(800, 800, 800)}
    assert verdicts(promises)[11] == "**not met**"


def test_a_scenario_not_run_says_why_on_each_of_its_bounds() -> None:
    promises = all_met()
    promises["coalescing"] = {"not_run": "batching.coalesce refused by the settings"}
    rows = promise_rows(promises)
    coalescing = [row for row in rows if row[0] == "Coalescing"]
    assert len(coalescing) == 3
    assert all(r[3] == "not run" and "batching.coalesce refused" in r[2] for r in coalescing)
    assert [r[3] for r in rows if r[0] != "Coalescing"] == ["met"] * 10


def test_the_last_runs_promises_render_in_full() -> None:
    """The committed results of the last `make bench` render every scenario's table, and the
    verdicts BENCHMARKS.md shows are those promise_rows gives for them."""
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    if "promises" not in results:
        pytest.skip("bench/results/results.json has no promises phase")
    lines = _promises_lines(copy.deepcopy(results))
    text = "\n".join(lines)
    for heading in ("Priorities:", "Deadlines:", "Coalescing:", "Retry storm:", "A lone client:", "64 clients:"):
        assert heading in text
    table = [line for line in lines if line.startswith("| ") and line.endswith(("| met |", "| **not met** |"))]
    assert [line.rsplit("|", 2)[1].strip() for line in table] == verdicts(results["promises"])
    benchmarks = (RESULTS.parents[2] / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert all(line in benchmarks for line in table)
