"""python -m loadtest (or `batcher loadtest`): load batcher over HTTP and report what it did.

python -m loadtest run --concurrency 64 --duration 20
python -m loadtest run --rate 300 --arrival poisson --duration 20
python -m loadtest run --sweep rate=100,200,400,800 --slo-p99-ms 50
python -m loadtest run --rate 4000 --priority-mix high=0.2,normal=0.8 --deadline-ms 100
python -m loadtest run --concurrency 512 --retry storm   # resend at once on 429, a probe beside
python -m loadtest classic            # the old test script's three tests
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import uvloop

from loadtest import report
from loadtest.classic import run_classic
from loadtest.corpus import DEFAULT_CORPUS, Corpus
from loadtest.driver import Load
from loadtest.modes import RETRY_MODES, Modes, parse_priority_mix
from loadtest.steps import highest_within_slo, run_steps


def parse_loads(args: argparse.Namespace) -> list[Load]:
    if args.sweep:
        kind, _, values = args.sweep.partition("=")
        if kind not in ("concurrency", "rate") or not values:
            raise SystemExit("loadtest: --sweep takes concurrency=1,4,16 or rate=100,200,400")
        numbers = [float(v) for v in values.split(",") if v]
        return [Load("closed" if kind == "concurrency" else "open", n, args.arrival) for n in numbers]
    if args.rate is not None:
        return [Load("open", args.rate, args.arrival)]
    return [Load("closed", args.concurrency)]


def parse_modes(args: argparse.Namespace) -> Modes | None:
    """The priority mix, deadline and retry mode asked for (None: plain requests)."""
    if args.priority_mix is None and args.deadline_ms is None and args.retry is None:
        return None
    try:
        mix = parse_priority_mix(args.priority_mix) if args.priority_mix is not None else ()
    except ValueError as exc:
        raise SystemExit(f"loadtest: --priority-mix: {exc}") from None
    if args.retry is not None and (args.rate is not None or (args.sweep or "").startswith("rate")):
        raise SystemExit("loadtest: --retry is for closed-loop clients (--concurrency), not --rate")
    if args.deadline_ms is not None and args.deadline_ms <= 0:
        raise SystemExit("loadtest: --deadline-ms takes a number of milliseconds above 0")
    return Modes(
        priority_mix=mix,
        deadline_ms=args.deadline_ms,
        retry=args.retry,
        probe_interval_ms=args.probe_ms if args.retry is not None else 0.0,
    )


def build_parser(prog: str = "python -m loadtest") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="closed- or open-loop load, one step or a sweep")
    run.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    load = run.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, default=64, help="closed loop: clients (default: %(default)s)")
    load.add_argument("--rate", type=float, help="open loop: requests per second")
    load.add_argument("--sweep", help="concurrency=1,4,16,64 or rate=100,200,400: one step per value")
    run.add_argument(
        "--arrival",
        choices=["poisson", "constant"],
        default="poisson",
        help="open-loop arrivals: Poisson (exponential gaps) or evenly spaced (default: %(default)s)",
    )
    run.add_argument(
        "--slo-p99-ms",
        type=float,
        help="stop a sweep at the first step whose p99 (ms) breaks this, and report the highest step that held it",
    )
    run.add_argument("--duration", type=float, default=10, help="measured seconds per step (default: %(default)s)")
    run.add_argument(
        "--warmup", type=float, default=2, help="unmeasured seconds before each step (default: %(default)s)"
    )
    run.add_argument(
        "--seed",
        type=int,
        default=1,
        help="random seed for the corpus order and the arrival times (default: %(default)s)",
    )
    run.add_argument(
        "--corpus", type=Path, default=DEFAULT_CORPUS, help="JSONL of {turns: [...]} (default: test split)"
    )
    run.add_argument(
        "--endpoint",
        choices=["predict", "batch", "oip", "classify"],
        default="predict",
        help="/predict, /predict/batch, the Open Inference Protocol's /v2/models/MODEL/infer, or a text "
        "classifier's /classify with {input: [text]} (Infinity) (default: %(default)s)",
    )
    run.add_argument(
        "--batch-items", type=int, default=8, help="items per /predict/batch request (default: %(default)s)"
    )
    run.add_argument("--model", default="intent-zh", help="the model --endpoint oip names (default: %(default)s)")
    run.add_argument(
        "--zipf",
        type=float,
        default=0.0,
        help="repeat dialogues Zipf-distributed with this exponent, as real traffic does (default: off, each in turn)",
    )
    run.add_argument(
        "--timeout",
        type=float,
        default=30,
        help="per-request timeout in seconds; counted as `timeout` (default: %(default)s)",
    )
    run.add_argument(
        "--priority-mix",
        metavar="high=SHARE,normal=SHARE,low=SHARE",
        help="send x-priority on these shares of requests (the rest without); report latency and statuses by priority",
    )
    run.add_argument(
        "--deadline-ms",
        type=float,
        help="send x-deadline-ms: N on every request; report answers within it per second (goodput), late 200s "
        "(client- and server-side) and 429s by error type",
    )
    run.add_argument(
        "--retry",
        choices=RETRY_MODES,
        help="closed loop: on 429 resend the same request at once (storm) or after x-retry-after-ms / Retry-After "
        "(polite); a probe process meanwhile sends one request every --probe-ms on a new connection",
    )
    run.add_argument(
        "--probe-ms",
        type=float,
        default=50,
        help="with --retry: ms between the probe's requests; 0: no probe (default: %(default)s)",
    )
    run.add_argument("--out", type=Path, help="write JSON, CSV and PNG plots here (default: loadtest/results/<time>)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    classic = commands.add_parser("classic", help="the old test script: one request, 20 runs per case, 10 concurrent")
    classic.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    return parser


async def main_run(args: argparse.Namespace) -> int:
    corpus = Corpus(args.corpus, seed=args.seed, batch_items=args.batch_items, zipf=args.zipf)
    loads = parse_loads(args)
    modes = parse_modes(args)
    rows = await run_steps(
        args.url,
        loads,
        corpus=corpus,
        endpoint=args.endpoint,
        model=args.model,
        duration_s=args.duration,
        warmup_s=args.warmup,
        seed=args.seed,
        timeout_s=args.timeout,
        slo_p99_ms=args.slo_p99_ms,
        modes=modes,
    )
    print(report.table(rows))
    if modes is not None:
        print(report.modes_table(rows))
    if args.slo_p99_ms is not None:
        best = highest_within_slo(rows, args.slo_p99_ms)
        print(
            f"highest throughput holding p99 <= {args.slo_p99_ms:g} ms: "
            + (f"{best['throughput_rps']:.1f} req/s at {best['load']}" if best else "none")
        )
    out = args.out or Path("loadtest/results") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    report.write(rows, out, "steps")
    if not args.no_plots:
        report.plot_latency({args.url: rows}, out / "latency.png", "latency vs throughput")
        report.plot_batch_sizes(rows, out / "batch_sizes.png", "batch sizes per step")
    print(f"results in {out}/")
    return 0


def main(argv: list[str] | None = None, *, prog: str = "python -m loadtest") -> int:
    """The command line; `prog` names it in usage (`batcher loadtest` runs it too)."""
    args = build_parser(prog).parse_args(argv)
    if args.command == "classic":
        return uvloop.run(run_classic(args.url))
    return uvloop.run(main_run(args))


if __name__ == "__main__":
    sys.exit(main())
