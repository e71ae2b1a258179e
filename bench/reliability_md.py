"""Render RELIABILITY.md (and its soak plot) from reliability/results.json."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from loadtest.report import pyplot

MIB = 2**20


def _ok(condition: bool) -> str:
    return "met" if condition else "**not met**"


def _answers(statuses: dict[str, int]) -> str:
    return ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items()))


def plot_soak(minutes: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    figure, left = plt.subplots(figsize=(7.5, 4))
    x = list(range(1, len(minutes) + 1))
    left.plot(x, [m["p99_ms"] for m in minutes], "-o", color="C0", label="p99 (ms)")
    left.set_xlabel("minute")
    left.set_ylabel("p99 latency (ms)", color="C0")
    right = left.twinx()
    right.plot(x, [m["rss_bytes"] / MIB for m in minutes], "-s", color="C1", label="RSS (MiB)")
    right.set_ylabel("server RSS (MiB)", color="C1")
    left.set_title("soak at 70 % of maximum throughput")
    left.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _delay(shutdown: dict[str, Any]) -> str:
    delay = shutdown.get("drain_delay_ms")
    return "the server's log did not give it" if delay is None else f"{delay} ms in this run"


def _trend(minutes: list[dict[str, Any]]) -> str:
    """Whether the soak drifts (what the first-vs-last bound is after), beside how much a minute swings."""
    p99 = [float(m["p99_ms"]) for m in minutes]
    rss = [m["rss_bytes"] for m in minutes]
    grew = [index for index in range(1, len(rss)) if rss[index] > rss[index - 1]]
    slope = statistics.linear_regression(range(1, len(p99) + 1), p99).slope if len(p99) > 1 else 0.0
    last_growth = f"RSS last grew in minute {grew[-1] + 1}" if grew else "RSS never grew after the first minute"
    return (
        f"Minute by minute the p99 ranged from {min(p99):.1f} to {max(p99):.1f} ms; a straight line fitted "
        f"through all {len(p99)} minutes moves {slope:+.1f} ms a minute, and {last_growth}."
    )


def _late_reads(shutdown: dict[str, Any]) -> str:
    refused = shutdown["before"].get("503", 0)
    if not refused:
        return ""
    return (
        f" The other way round, {refused} request{'s' if refused > 1 else ''} sent just before that instant "
        "reached the server's event loop just after it and got the 503 of a draining server: refused, not "
        "admitted, so none was lost."
    )


def _generator_us(minute: dict[str, Any]) -> float:
    return float(minute["client_cpu_share"]) / float(minute["throughput_rps"]) * 1e6


def _server_us(minute: dict[str, Any]) -> float:
    """The server process's CPU per request (event loop and model threads)."""
    return float(minute["server"].get("server_cpu_share") or 0.0) / float(minute["throughput_rps"]) * 1e6


def _normalised_cpu(minute: dict[str, Any]) -> float:
    """The server's CPU per request in units of the generator's own: what the soak's band holds."""
    generator = _generator_us(minute)
    return _server_us(minute) / generator if generator else 0.0


def _loop_us(minute: dict[str, Any]) -> float:
    return float(minute["server"].get("event_loop_cpu_us_per_request") or 0.0)


def _model_ms(server: dict[str, Any], rps: float) -> float:
    """Model-run time per request (both instances summed; wall time, preemptions included)."""
    return float(server.get("model_busy_share") or 0.0) / rps * 1000 if rps else 0.0


def _against_peak(overload: dict[str, Any], minutes: list[dict[str, Any]]) -> str:
    server = overload.get("peak_server")
    if not server:  # runs before it was recorded
        return ""
    soak_ms = [_model_ms(m["server"], m["throughput_rps"]) for m in minutes]
    return (
        f", against {server.get('mean_batch_size') or 0:.1f} in the 64-client step that measured the maximum; "
        f"the model took {min(soak_ms):.2f} to {max(soak_ms):.2f} ms a request here, against "
        f"{_model_ms(server, overload['peak_rps']):.2f} ms there"
    )


def _batch(minute: dict[str, Any]) -> float:
    return float(minute["server"].get("mean_batch_size") or 0.0)


def _cores_busy(minute: dict[str, Any]) -> float:
    """Cores the server and the load generator used together (of the machine's 2)."""
    return float(minute["server"].get("server_cpu_share") or 0.0) + float(minute["client_cpu_share"])


def _change(minutes: list[dict[str, Any]], per_request: Any) -> str:
    first, last = per_request(minutes[0]), per_request(minutes[-1])
    return f"{last / first - 1:+.0%}" if first else "n/a"


def render(results: dict[str, Any], out_dir: Path) -> str:
    overload = results["overload"]
    spike, after = overload["spike"], overload["after"]
    refused_p99 = spike["p99_ms_by_status"].get("429")
    refused_p99_sent = spike.get("p99_ms_by_status_from_send", {}).get("429")
    unanswered = sum(spike["statuses"].get(k, 0) for k in ("timeout", "refused", "connection_error"))
    storm = results["disconnect"]
    shutdown = results["shutdown"]
    lost = sum(count for status, count in shutdown["before"].items() if not status.isdigit())
    lines = [
        "# Reliability",
        "",
        f"Measured on {results['date']}, commit `{results.get('commit') or 'unknown'}`, on {results['machine']}, "
        "by one run of `make reliability` "
        f"(`{results['command']}`). Server: `app.py` with the shipped `config.toml` (bundled model, defaults), "
        "on loopback; the load generator shares the same 2 cores.",
        "",
        "## Overload: open loop at 3 × the maximum throughput",
        "",
        f"Maximum measured first: {overload['peak_rps']:.0f} req/s (64 clients). Spike: "
        f"{spike['load']} for {spike['duration_s']:.0f} s.",
        "",
        "| bound | measured | |",
        "|---|---|---|",
        f"| every request answered (200, or 429/503/504 with a JSON error) | {_answers(spike['statuses'])}; "
        f"unsent by the generator: {spike['unsent']}, late: {spike['late']} | {_ok(unanswered == 0)} |",
        f"| 429s come back fast: p99 < 5 ms | p99 of 429s {refused_p99} ms from the scheduled send time "
        f"({refused_p99_sent} ms from the moment the generator began sending) | "
        f"{_ok(refused_p99 is not None and refused_p99 < 5)} |",
        f"| admitted requests keep a bounded p99 | p99 of 200s {spike['p99_ms_by_status'].get('200')} ms "
        f"(request_timeout_s bounds it at 10 s) | {_ok((spike['p99_ms_by_status'].get('200') or 1e9) < 10_000)} |",
        f"| RSS stays bounded | {overload['rss_start'] / MIB:.0f} MiB before, {overload['rss_max'] / MIB:.0f} MiB "
        f"max, {overload['rss_end'] / MIB:.0f} MiB at the end "
        f"| {_ok(overload['rss_max'] < 2 * overload['rss_start'])} |",
        f"| throughput back to normal within 5 s | {after['throughput_rps']:.0f} req/s in the 5 s right after "
        f"({after['throughput_rps'] / overload['peak_rps']:.0%} of the maximum) "
        f"| {_ok(after['throughput_rps'] >= 0.9 * overload['peak_rps'])} |",
        f"| the server stays up | answered the 5 s recovery step: {_answers(after['statuses'])} "
        f"| {_ok(after['statuses'].get('200', 0) > 0)} |",
        "",
        f"The generator used {spike['client_cpu_share']:.0%} of a core during the spike. Latency is measured "
        "from each request's scheduled send time, on the same 2 cores as the server and its two model threads, "
        "so the 429 figure includes time the request waited for the generator and for the server's event loop; "
        "the figure from the moment of sending leaves the generator's own lateness out.",
        "",
        "## Disconnect storm",
        "",
        "Clients that send a long request and hang up after 5 ms, 20 at a time, for "
        f"{storm['during']['duration_s']:.0f} s, beside 16 normal closed-loop clients.",
        "",
        "| | measured |",
        "|---|---|",
        f"| hang-up requests sent | {storm['storm_sent']} |",
        f"| normal requests answered | {storm['normal_sent']} |",
        f"| rows the model computed | {storm['rows_computed']:.0f} "
        f"({_ok(storm['normal_sent'] <= storm['rows_computed'] < storm['storm_sent'] + storm['normal_sent'])}: "
        "at least the normal requests, fewer than all requests sent) |",
        f'| `batcher_rejected_total{{reason="disconnected"}}` | {storm["disconnected"]:.0f} |',
        f"| normal clients without the storm: p50 / p99 | {storm['baseline']['p50_ms']:.1f} / "
        f"{storm['baseline']['p99_ms']:.1f} ms, {storm['baseline']['throughput_rps']:.0f} req/s |",
        f"| normal clients during the storm: p50 / p99 | {storm['during']['p50_ms']:.1f} / "
        f"{storm['during']['p99_ms']:.1f} ms, {storm['during']['throughput_rps']:.0f} req/s |",
        "",
        "Hang-ups the server notices before their batch forms are skipped; one that is already in a running "
        "batch is computed and its answer dropped. The normal clients share the event loop with the storm's "
        "connection handling, which is what slows them.",
        "",
        "## Shutdown under load",
        "",
        f"SIGTERM 4 s into an open-loop overload at {shutdown['rate']} req/s (shutdown_timeout_s = 20).",
        "",
        "| bound | measured | |",
        "|---|---|---|",
        f"| no accepted request lost: every request sent before the drain began gets an HTTP answer | "
        f"{_answers(shutdown['before'])} | {_ok(lost == 0)} |",
        f"| new requests after the drain began get 503, or a refused connection once the listener closes; "
        f"none is cut | {_answers(shutdown['after'])} | {_ok(set(shutdown['after']) <= {'503', 'refused'})} |",
        f"| exit 0 within shutdown_timeout_s | exit {shutdown['exit_code']} after {shutdown['exit_s']} s, "
        f"{shutdown['tracebacks']} tracebacks | {_ok(shutdown['exit_code'] == 0 and shutdown['exit_s'] <= 20)} |",
        "",
        '"Before" and "after" split at the instant the server began draining, which it logs on the monotonic '
        "clock the generator also reads: the signal callback itself drops readiness and refuses admission, so "
        "nothing read after it is admitted. A request written between the generator's `kill` and that "
        f"instant ({_delay(shutdown)}) is read before the drain and answered like any other.{_late_reads(shutdown)}",
        "",
    ]
    if "scheduling" in results:
        lines += [
            "## Why the 429s are fast: the model threads' scheduling policy, side by side",
            "",
            "The same overload rate for "
            f"{results['scheduling'][0]['spike']['duration_s']:.0f} s (after 2 s at that rate, not counted: the "
            "steady state, where the overload step above includes the spike's onset) and the same 64 closed-loop "
            "clients against "
            "two servers that differ only in `batching.worker_sched_idle`. Under SCHED_IDLE any runnable thread "
            "of normal priority, the event loop first, takes a core from the model at once; with a niceness the "
            "loop waits in the run queue behind the model's threads.",
            "",
            "| model threads | 64 clients, req/s | 429 p99 ms (from schedule / from send) | 200 p99 ms "
            "| event loop's run-queue wait, ms per s |",
            "|---|---|---|---|---|",
        ]
        for row in results["scheduling"]:
            spike_row = row["spike"]
            lines.append(
                f"| {row['variant']} | {row['closed_64_rps']:.0f} | {spike_row['p99_ms_by_status'].get('429')} / "
                f"{spike_row['p99_ms_by_status_from_send'].get('429')} | {spike_row['p99_ms_by_status'].get('200')} "
                f"| {row['loop_run_queue_wait_ms_per_s']} |"
            )
        lines.append("")
    if "faults" in results:
        lines += faults_section(results["faults"]["matrix"], results["faults"].get("rate"))
    if "soak" in results:
        soak = results["soak"]
        minutes = soak["minutes"]
        plot_soak(minutes, out_dir / "soak.png")
        growth = minutes[-1]["rss_bytes"] / minutes[0]["rss_bytes"] - 1
        p99_change = minutes[-1]["p99_ms"] / minutes[0]["p99_ms"] - 1
        first, last = _normalised_cpu(minutes[0]), _normalised_cpu(minutes[-1])
        cpu_change = last / first - 1 if first else None
        errors = sum(v for m in minutes for k, v in m["statuses"].items() if k != "200")
        lines += [
            f"## Soak: {len(minutes)} minutes at {soak['rate']} req/s (70 % of the maximum)",
            "",
            "| bound | measured | |",
            "|---|---|---|",
            f"| RSS growth under 5 % | {minutes[0]['rss_bytes'] / MIB:.1f} → {minutes[-1]['rss_bytes'] / MIB:.1f} MiB "
            f"({growth:+.1%}) | {_ok(growth < 0.05)} |",
            "| the server's CPU per request, in units of the generator's own (the machine-speed gauge): the last "
            f"minute within 20 % of the first | {first:.2f} → {last:.2f} "
            f"({f'{cpu_change:+.0%}' if cpu_change is not None else 'n/a'}) "
            f"| {_ok(cpu_change is not None and abs(cpu_change) <= 0.2)} |",
            f"| zero errors | {errors} | {_ok(errors == 0)} |",
            "",
            "The load generator does the same work for every request all along, so its CPU per request gauges "
            "how fast the shared machine itself ran: from the first minute to the last it changed by "
            f"{_change(minutes, _generator_us)} (batcher's event loop, per request: {_change(minutes, _loop_us)}; "
            f"the server's whole process: {_change(minutes, _server_us)}). The band is on the server's CPU per request "
            "over the generator's, so that it measures the server, not the machine: the p99, which the "
            "band was on before, moves with the machine's speed as much as with the server's, "
            f"{minutes[0]['p99_ms']:.1f} → {minutes[-1]['p99_ms']:.1f} ms ({p99_change:+.0%}) here.",
            "",
            _trend(minutes),
            "",
            "How close to the machine's limit this rate runs: the server and the generator kept "
            f"{min(map(_cores_busy, minutes)):.2f} to {max(map(_cores_busy, minutes)):.2f} of the 2 cores busy, "
            f"with batches of {min(_batch(m) for m in minutes):.1f} to {max(_batch(m) for m in minutes):.1f} "
            f"requests on average{_against_peak(results['overload'], minutes)}.",
            "",
            "| minute | req/s | p50 ms | p99 ms | RSS MiB | mean batch | cores busy | event loop CPU µs/req "
            "| server CPU µs/req | generator CPU µs/req | server / generator |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for index, m in enumerate(minutes, 1):
            lines.append(
                f"| {index} | {m['throughput_rps']:.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} "
                f"| {m['rss_bytes'] / MIB:.1f} | {_batch(m):.1f} | {_cores_busy(m):.2f} | {_loop_us(m):.0f} "
                f"| {_server_us(m):.0f} | {_generator_us(m):.0f} | {_normalised_cpu(m):.2f} |"
            )
        lines += ["", "![RSS and p99 over the soak](reliability/soak.png)", ""]
    lines += [
        "## Fault, hostile-input and shutdown tests (pytest, same run)",
        "",
        "| tests | outcome | seconds |",
        "|---|---|---|",
    ]
    for test in results["tests"]:
        lines.append(
            f"| `{' '.join(test['selection'])}` | {test['summary'] or 'exit ' + str(test['exit_code'])} "
            f"| {test['seconds']} |"
        )
    lines.append("")
    if "fuzz" in results:
        fuzz = results["fuzz"]
        lines += [
            "## Fuzzing (schemathesis against /openapi.json)",
            "",
            f"`{fuzz['command']}`: exit {fuzz['exit_code']}. {fuzz['summary']}",
            "",
        ]
    if "http_fuzz" in results:
        lines += http_fuzz_section(results["http_fuzz"])
    lines += ["Raw figures: `reliability/results.json`.", ""]
    return "\n".join(lines)


def http_fuzz_section(fuzz: dict[str, Any]) -> list[str]:
    """The HTTP layer below the schema: what `bench/http_fuzz.py` sent and what came back."""
    clean = not fuzz["failed"] and fuzz["ready_after"] and not fuzz["log_tracebacks"]
    lines = [
        "## Fuzzing the HTTP layer (raw requests: methods, paths, headers, encodings, framing)",
        "",
        f"`python -m bench.http_fuzz --examples {fuzz['requests']} --seed {fuzz['seed']}` (Hypothesis): "
        f"{fuzz['requests']} requests, {fuzz['failed']} failed (a 5xx, no answer within 5 s, a 4xx not in the "
        f"error shape), server ready afterwards: {'yes' if fuzz['ready_after'] else 'NO'}, tracebacks in its log: "
        f"{fuzz['log_tracebacks']}. {'Met.' if clean else 'NOT met.'}",
        "",
        "| answer | requests |",
        "|---|---|",
    ]
    lines += [f"| {status} | {count} |" for status, count in fuzz["statuses"].items()]
    lines += ["", "A bare status is an answer to HEAD (no body to check)."]
    if fuzz["failures"]:
        lines += ["", "First failures:", ""] + [f"- `{failure[:300]}`" for failure in fuzz["failures"]]
    return [*lines, ""]


# The fault matrix ---------------------------------------------------------------------------

SUPERVISOR_POLL_S = 0.25
"""How late after its backoff the supervisor may start a worker again: it looks every 0.2 s."""
HEALTHZ_BOUND_MS = 60.0
STOP_RECOVERY_S = 5.0
DESCRIPTOR_RECOVERY_S = 1.0
SPIN_SHARE = 0.25
"""More event-loop CPU at the descriptor limit than before it, in cores, that counts as spinning."""
TRANSIENT_DESCRIPTORS = 2
"""Descriptors the server may hold for a moment besides connections (a /proc read, its own check)."""

Check = tuple[str, bool]


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1000:.0f} ms"


def _no_failed(f: dict[str, Any]) -> Check:
    """0 failed requests: every one answered, none with a 5xx (a 429, the server's refusal
    under overload, is an answer: on this shared machine a slow moment can bring some)."""
    return (
        f"0 failed requests: every one answered, no 5xx ({_answers(f['statuses'])})",
        f["lost"] == 0 and f["server_errors"] == 0 and set(f["statuses"]) <= {"200", "429"},
    )


def _prediction_log_full(f: dict[str, Any]) -> dict[str, Any]:
    checks: list[Check] = [
        _no_failed(f),
        (
            f"dropped lines counted (`batcher_prediction_log_dropped_total` {f['dropped']:.0f}, for "
            f"{f['predictions']:.0f} predictions answered)",
            0 < f["dropped"] == f["predictions"],
        ),
        (
            f"one warning, no traceback ({_count(f['warnings'], 'warning')} in the server's log, "
            f"{_count(f['tracebacks'], 'traceback')})",
            f["warnings"] == 1 and f["tracebacks"] == 0,
        ),
    ]
    return {
        "title": "Prediction log on a full device (`/dev/full`: ENOSPC)",
        "bound": "0 failed requests; dropped lines counted; one warning, no traceback",
        "recovery": "— (the device stays full)",
        "checks": checks,
    }


def _prediction_log_unwritable(f: dict[str, Any]) -> dict[str, Any]:
    missing = f["predictions"] - f["written"]
    checks: list[Check] = [
        _no_failed(f),
        (
            f"dropped lines counted ({f['dropped']:.0f}, for {missing:.0f} predictions without a line: "
            f"{f['written']} lines written of {f['predictions']:.0f})",
            0 < f["dropped"] == missing,
        ),
        (
            f"one warning, no traceback ({_count(f['warnings'], 'warning')} in the server's log and "
            f"{f['written_again_logged']} info line saying it writes again; {_count(f['tracebacks'], 'traceback')})",
            f["warnings"] == 1 and f["written_again_logged"] == 1 and f["tracebacks"] == 0,
        ),
        (
            f"writes again by itself (the first line {_ms(f['recovery_s'])} after the file could be written again)",
            f["recovery_s"] is not None,
        ),
    ]
    return {
        "title": f"Prediction log unwritable for 5 s: {f['how']}",
        "bound": "0 failed requests; dropped lines counted; one warning, no traceback",
        "recovery": f"{f['recovery_s']:.3f} s" if f["recovery_s"] is not None else "never",
        "checks": checks,
    }


def _descriptor_limit(f: dict[str, Any]) -> dict[str, Any]:
    free = f["limit"] - f["open_before"]
    flood, knocks = f["flood"], f["knocks"]
    checks: list[Check] = [
        (
            f"the clients it could accept are answered ({flood.get('200', 0)} of the {free} connections its free "
            f"descriptors allowed answered 200, {flood.get('cut', 0)} more closed unanswered at once; of "
            f"{sum(knocks.values())} later ones, {knocks.get('200', 0)} answered)",
            flood.get("200", 0) >= free - TRANSIENT_DESCRIPTORS and set(flood) <= {"200", "cut"},
        ),
        (
            f"the clients connected before are served throughout ({_answers(f['statuses'])})",
            f["lost"] == 0 and f["server_errors"] == 0,
        ),
        (
            f"the loop does not spin (event-loop CPU {f['loop_share_before']:.2f} of a core before, "
            f"{f['loop_share_at_limit']:.2f} at the limit)",
            f["loop_share_at_limit"] <= f["loop_share_before"] + SPIN_SHARE,
        ),
        (
            f"normal again within 1 s (a new connection answered {_ms(f['recovery_s'])} after the others closed; "
            f"the next 20: {_answers(f['after'])})",
            f["recovery_s"] is not None
            and f["recovery_s"] <= DESCRIPTOR_RECOVERY_S
            and f["after"] == {"200": sum(f["after"].values())},
        ),
        (
            f"one warning, no traceback ({_count(f['warnings'], 'warning')} in the server's log, "
            f"{_count(f['tracebacks'], 'traceback')})",
            f["warnings"] == 1 and f["tracebacks"] == 0,
        ),
    ]
    return {
        "title": (
            f"File-descriptor limit ({f['limit']}) reached: {sum(flood.values())} connections at once, each "
            "sending a request, then a new one every 20 ms for 3 s, beside 2 closed-loop clients"
        ),
        "bound": "accepts neither spin nor crash; the clients it could accept are answered; normal within 1 s",
        "recovery": f"{f['recovery_s']:.3f} s" if f["recovery_s"] is not None else "never",
        "checks": checks,
        "answered": f["answered"] + flood.get("200", 0) + knocks.get("200", 0),
        "note": (
            "Out of descriptors, libuv (under uvloop) accepts each new connection and closes it at once, with a "
            "descriptor it keeps spare for that, so the listener never stays readable for the loop to spin on; "
            "the warning is the server's own check, a dup() of the listening socket once a second."
        ),
    }


def _stopped(f: dict[str, Any]) -> dict[str, Any]:
    fillers = f["fillers"]
    unanswered = f["rows_computed"] - f["answered_200_by_server"]
    recovery = f["recovery_s"]
    checks: list[Check] = [
        (
            f"nothing lost (the load: {_answers(f['statuses'])}; the requests queued before the stop: "
            f"{_answers(fillers)})",
            f["lost"] == 0 and "cut" not in fillers,
        ),
        (
            f"what expired is answered 504 ({f['answered_504']} answers 504, {f['expired_by_server']:.0f} "
            'requests counted expired in `batcher_rejected_total{reason="deadline"}`; no other 5xx)',
            f["answered_504"] == f["expired_by_server"]
            and f["server_errors"] == f["statuses"].get("504", 0)
            and set(fillers) <= {"200", "429", "504"},
        ),
        (
            f"never computed late ({f['rows_started_late']:.0f} rows began their model run after their deadline, "
            f"by `batcher_queue_wait_seconds`; the model computed {f['rows_computed']:.0f} rows and "
            f"{f['answered_200_by_server']:.0f} were answered 200: the {unanswered:.0f} others were in runs "
            "under way when their deadline passed)",
            f["rows_started_late"] == 0,
        ),
        (
            f"p99 back to its level within 5 s (the 1-s windows before the fault had a p99 of at most "
            f"{f.get('p99_before_worst_window_ms', f['p99_before_ms'])} ms, {f['p99_before_ms']} ms over them all; "
            f"the requests sent in the 1-s window starting {recovery if recovery is not None else 'never'} s after "
            "SIGCONT had a p99 at most that, windows tried every 0.25 s)",
            recovery is not None and recovery <= STOP_RECOVERY_S,
        ),
    ]
    return {
        "title": (
            f"SIGSTOP for {f['stop_s']:.0f} s, then SIGCONT, with request_timeout_s = {f['request_timeout_s']:g} s "
            f"and {sum(fillers.values())} requests queued just before the stop"
        ),
        "bound": "what expired is answered 504 or skipped, never computed late; p99 back within 5 s",
        "recovery": f"{recovery:.2f} s" if recovery is not None else "never",
        "checks": checks,
        "answered": f["answered"] + sum(n for status, n in fillers.items() if status.isdigit()),
        "lost": f["lost"] + fillers.get("cut", 0),
        "server_errors": f"{f['server_errors'] + fillers.get('504', 0)} (504: expired)",
        "note": (
            "The requests sent while the process was stopped reach it at once when it resumes; those beyond its "
            "queue (`batching.max_queue_size`) are refused 429 at once, as under any overload, and answered, "
            "not lost."
        ),
    }


def _worker_killed(f: dict[str, Any]) -> dict[str, Any]:
    per_second = [count for _, count, _ in f["windows_after_kill"]]
    back, backoff, startup, noticed = f["back_s"], f["backoff_s"], f["restart_startup_s"], f["noticed_s"]
    in_time = None not in (back, backoff, startup, noticed) and back <= noticed + backoff + SUPERVISOR_POLL_S + startup
    checks: list[Check] = [
        (f"killed while its model thread ran ({'yes' if f['mid_batch'] else 'no'})", f["mid_batch"]),
        (
            f"the other keeps serving ({min(per_second, default=0)} to {max(per_second, default=0)} requests "
            "answered each second after the kill)",
            min(per_second, default=0) > 0,
        ),
        (
            f"only what the kill cut is lost ({f['lost']} requests, in flight on the killed worker; none sent more "
            f"than 1 s after it; 5xx: {f['server_errors']})",
            f["lost"] <= f["clients"] and f["lost_after_1s"] == 0 and f["server_errors"] == 0,
        ),
        (
            f"back within its backoff plus its start-up (noticed after {f['noticed_s']} s, started again after "
            f"{f['respawned_s']} s with a backoff of {backoff} s, serving after {back} s: its start-up took "
            f"{startup} s under load, {f['startup_s']} s at the first start)",
            bool(in_time),
        ),
        (
            f"counters summed over workers never fall ({f['scrapes']} scrapes of /metrics 0.2 s apart, "
            f"{len(f['counters_backwards'])} counter series fell)",
            not f["counters_backwards"] and f["scrapes"] > 10,
        ),
        (f"no traceback ({f['tracebacks']} in the log)", f["tracebacks"] == 0),
    ]
    return {
        "title": f"One of 2 workers killed (SIGKILL) during a model run, under {f['clients']} closed-loop clients",
        "bound": "the other keeps serving; back within backoff + start-up; summed counters never fall",
        "recovery": f"{back:.2f} s" if back is not None else "never",
        "checks": checks,
    }


def _bundle_removed(f: dict[str, Any]) -> dict[str, Any]:
    checks: list[Check] = [
        _no_failed(f),
        (
            f"the old version keeps serving ({f['version_before']} before, {f['version_after']} after)",
            f["version_before"] == f["version_after"],
        ),
        (
            f"each reload error in the log and the reload metric ({f['errors_logged']} error lines, "
            f'`batcher_model_reloads_total{{result="failed"}}` {f["reloads_failed"]:.0f}, counted '
            f"{', '.join(f'{s} s' for s in f['reload_seconds'])} after each SIGHUP; "
            f"{_count(f['tracebacks'], 'traceback')})",
            f["errors_logged"] == 2 and f["reloads_failed"] == 2 and f["tracebacks"] == 0,
        ),
    ]
    return {
        "title": "The bundle's graph truncated on disk, SIGHUP; then the bundle removed, SIGHUP",
        "bound": "the old version keeps serving, 0 failed requests; the error in the log and the reload metric",
        "recovery": "— (served throughout)",
        "checks": checks,
    }


def _fast_lane_burst(f: dict[str, Any]) -> dict[str, Any]:
    sent = f["bursts"] * f["requests_per_burst"]
    answered = sum(f["answered_400"])
    slowest = f["healthz_max_ms"]
    checks: list[Check] = [
        (
            f"/healthz within {HEALTHZ_BOUND_MS:.0f} ms meanwhile ({f['healthz_during']} answers during the bursts, "
            f"the slowest {slowest} ms; {f['healthz_quiet_max_ms']} ms before them)",
            slowest is not None and f["healthz_during"] > 0 and slowest < HEALTHZ_BOUND_MS,
        ),
        (
            f"every burst request answered 400 ({', '.join(map(str, f['answered_400']))} of "
            f"{f['requests_per_burst']}, in {', '.join(f'{ms:.0f}' for ms in f['burst_ms'])} ms; "
            f"{_count(f['tracebacks'], 'traceback')})",
            answered == sent and f["tracebacks"] == 0,
        ),
    ]
    return {
        "title": (
            f"{f['bursts']} pipelined bursts of {f['requests_per_burst']} requests with bad JSON on one connection "
            f"({f['burst_bytes'] / 1024:.0f} KiB each; the fast lane), /healthz asked every 10 ms on another"
        ),
        "bound": f"/healthz answers within {HEALTHZ_BOUND_MS:.0f} ms; every burst request answered",
        "recovery": "—",
        "checks": checks,
        "answered": answered + f["healthz_during"],
        "lost": sent - answered,
        "server_errors": 0,
    }


FAULT_JUDGES = {
    "prediction_log_full": _prediction_log_full,
    "prediction_log_unwritable": _prediction_log_unwritable,
    "descriptor_limit": _descriptor_limit,
    "stopped": _stopped,
    "worker_killed": _worker_killed,
    "bundle_removed": _bundle_removed,
    "fast_lane_burst": _fast_lane_burst,
}


def judge_fault(name: str, figures: dict[str, Any]) -> dict[str, Any]:
    """One fault's row: its title, bound, answered / lost / 5xx, recovery, each check and whether all hold."""
    if "skipped" in figures:
        return {"title": name, "bound": "", "recovery": "—", "checks": [(f"not run: {figures['skipped']}", False)]}
    judged = FAULT_JUDGES[name](figures)
    for key in ("answered", "lost", "server_errors"):
        judged.setdefault(key, figures.get(key, 0))
    return judged


def faults_section(faults: dict[str, Any], rate: float | None) -> list[str]:
    judged = {name: judge_fault(name, figures) for name, figures in faults.items()}
    seconds = sum(float(figures.get("seconds", 0)) for figures in faults.values())
    load = f"open loop at {rate:.0f} req/s, 30 % of the maximum," if rate else "the load each row names"
    lines = [
        "## Faults injected under load",
        "",
        f"Each fault is injected into a fresh server (`app.py`, bundled model, defaults unless said) while the load "
        f"generator drives it ({load} unless said), 10-20 s each, {seconds:.0f} s in all. Lost: sent and never "
        "answered (a timeout or a cut connection); recovery: from the end of the fault to service as before.",
        "",
        "| fault | what must hold | answered | lost | 5xx | recovery | |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in judged.values():
        met = all(ok for _, ok in row["checks"])
        lines.append(
            f"| {row['title']} | {row['bound']} | {row.get('answered', '—')} | {row.get('lost', '—')} "
            f"| {row.get('server_errors', '—')} | {row['recovery']} | {_ok(met) if row['bound'] else '**not run**'} |"
        )
    lines.append("")
    for row in judged.values():
        lines += [f"**{row['title']}.**", ""]
        lines += [f"- {text}: {_ok(ok)}" for text, ok in row["checks"]]
        lines += ["", row["note"], ""] if row.get("note") else [""]
    return lines
