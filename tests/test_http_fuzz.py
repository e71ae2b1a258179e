"""A short run of the HTTP-layer fuzzer (bench/http_fuzz.py) against app.py as a process:
raw requests with odd methods, paths, headers, encodings and framing all get a complete
answer below 500, in the error shape, and leave the server ready with a clean log."""

from __future__ import annotations

import signal
from pathlib import Path

from bench import http_fuzz
from tests.processes import finish, start, wait_ready


def test_short_http_fuzz_run_finds_nothing(tiny_bundle: Path) -> None:
    process, url = start(tiny_bundle, "server.body_read_timeout_s=1")
    wait_ready(process, url)
    try:
        result = http_fuzz.run(url, examples=250, seed_value=http_fuzz.SEED)
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 20)
    assert result["failed"] == 0, result["failures"]
    assert result["ready_after"]
    assert code == 0 and "Traceback" not in output
    answered = sum(count for status, count in result["statuses"].items() if status[0] in "24")
    assert answered >= 200  # most requests reached an answer, not just the parser's door


def test_the_judge_fails_a_5xx_a_plain_text_4xx_and_a_broken_error_shape() -> None:
    ok = b'HTTP/1.1 422 Unprocessable\r\nContent-Type: application/json\r\n\r\n{"error":{"type":"t","message":"m"}}'
    assert http_fuzz.judge(ok, b"POST") == ("422 t", None)
    assert http_fuzz.judge(b"HTTP/1.1 500 Oops\r\n\r\nx", b"GET")[1] is not None
    assert http_fuzz.judge(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n\r\n404", b"GET")[1] is not None
    broken = b"HTTP/1.1 400 Bad\r\nContent-Type: application/json\r\n\r\n{}"
    assert http_fuzz.judge(broken, b"POST")[1] is not None
    continued = b"HTTP/1.1 100 Continue\r\n\r\n" + ok
    assert http_fuzz.judge(continued, b"POST") == ("422 t", None)
