"""A short schemathesis run against a real server (tiny real model) from its own /openapi.json:
no server errors, responses that match their schemas, every status documented."""

from __future__ import annotations

import signal
from pathlib import Path

from bench.fuzz import SCHEMATHESIS, run_schemathesis
from tests.processes import finish, start, wait_ready


def test_short_fuzz_run_finds_nothing(tiny_bundle: Path) -> None:
    assert SCHEMATHESIS.is_file(), "schemathesis is in requirements-dev.txt"
    process, url = start(tiny_bundle)
    wait_ready(process, url)
    try:
        result = run_schemathesis(url, examples=30, seed=1)
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 20)
    assert result["exit_code"] == 0, result["output_tail"]
    assert "passed" in result["summary"]
    assert code == 0 and "Traceback" not in output
