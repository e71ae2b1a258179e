"""Fuzz the server from its own /openapi.json with schemathesis: `make fuzz`.

Every operation, fixed seed, every check (schemathesis runs them all unless its config,
bench/schemathesis.toml, says otherwise: no server errors, responses conform to their
schemas, every status documented, invalid data rejected, valid data accepted).

    python -m bench.fuzz [--examples 3000] [--seed 20261125] [--url http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CONFIG = Path(__file__).with_name("schemathesis.toml")


def command(url: str, examples: int, seed: int) -> list[str]:
    # One worker: schemathesis' coverage phase has crashed in its own code with several.
    return [
        str(SCHEMATHESIS),
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--max-examples",
        str(examples),
        "--seed",
        str(seed),
        "--workers",
        "1",
        "--request-timeout",
        "30",
    ]


def run_schemathesis(url: str, examples: int, seed: int) -> dict[str, Any]:
    args = command(url, examples, seed)
    result = subprocess.run(args, capture_output=True, text=True)
    output = result.stdout + result.stderr
    cases = re.search(r"(\d+) generated, (.*)", output)
    summary = f"{cases.group(1)} test cases generated, {cases.group(2).strip()}" if cases else "no summary printed"
    return {
        "command": shlex.join(["schemathesis", *(_relative(arg) for arg in args[1:])]),
        "exit_code": result.returncode,
        "summary": summary,
        "output_tail": output[-3000:].replace(str(CONFIG.parent.parent) + "/", ""),
    }


def _relative(arg: str) -> str:
    """A path inside the repository as the reader's checkout would name it."""
    root = str(CONFIG.parent.parent) + "/"
    return arg.removeprefix(root)


def fuzz(examples: int, seed: int = 20261125) -> dict[str, Any]:
    """Start batcher (shipped config, bundled model) and fuzz it."""
    from bench.servers import batcher_server

    with batcher_server("batcher (defaults)") as server:
        return run_schemathesis(server.url, examples, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=3000, help="examples per operation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=20261125, help="schemathesis seed")
    parser.add_argument("--url", help="fuzz a running server instead of starting one")
    args = parser.parse_args()
    result = run_schemathesis(args.url, args.examples, args.seed) if args.url else fuzz(args.examples, args.seed)
    print(result["output_tail"])
    print(f"{result['command']}: exit {result['exit_code']}; {result['summary']}")
    sys.exit(result["exit_code"])


if __name__ == "__main__":
    main()
