"""batcher.prediction_log: a line it cannot write is dropped and counted, with one warning a
spell and no traceback; the file is reopened after rotation; and, in a real server, a
prediction log on a full device fails no request."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from batcher.prediction_log import LOGGER, PredictionLogHandler, count_drops
from tests.processes import finish, start, wait_ready

FULL = Path("/dev/full")


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord(LOGGER, logging.INFO, __file__, 1, message, None, None)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "batcher" and r.levelno == logging.WARNING]


@pytest.fixture
def predictions_logger() -> Iterator[logging.Logger]:
    """The predictions logger as the server sets it up, its handlers put back afterwards."""
    logger = logging.getLogger(LOGGER)
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield logger
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.propagate, logger.level = saved[0], saved[1], saved[2]


@pytest.mark.skipif(not FULL.exists(), reason="no /dev/full here")
def test_a_full_device_drops_and_counts_every_line_with_one_warning(
    predictions_logger: logging.Logger, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    handler = PredictionLogHandler(FULL)
    counted: list[float] = []
    predictions_logger.handlers[:] = [handler]
    predictions_logger.propagate = False
    predictions_logger.setLevel(logging.INFO)
    count_drops(counted.append)
    caplog.set_level(logging.INFO, logger="batcher")
    for index in range(100):
        predictions_logger.info('{"line": %d}', index)  # never raises into the caller
    assert handler.dropped == 100 and sum(counted) == 100
    assert len(warnings(caplog)) == 1
    assert "No space left on device" in warnings(caplog)[0] and str(FULL) in warnings(caplog)[0]
    assert "Traceback" not in capsys.readouterr().err  # logging's handleError prints one per line


def test_an_unwritable_path_warns_once_a_spell_and_says_when_it_writes_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batcher")
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "predictions.jsonl"
    handler = PredictionLogHandler(path)
    counted: list[float] = []
    handler.on_drop = lambda: counted.append(1)
    handler.handle(record("one"))
    shutil.rmtree(directory)  # rotated away, and the directory gone: the reopen fails
    for _ in range(5):
        handler.handle(record("lost"))
    assert handler.dropped == 5 and len(counted) == 5 and len(warnings(caplog)) == 1
    directory.mkdir()
    handler.handle(record("two"))
    assert path.read_text() == "two\n"
    assert any("written again, 5 lines dropped meanwhile" in r.getMessage() for r in caplog.records)
    shutil.rmtree(directory)
    handler.handle(record("lost again"))
    assert handler.dropped == 6 and len(warnings(caplog)) == 2  # a new spell, a new warning
    handler.close()


def test_a_rotated_file_is_reopened_at_its_path(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    handler = PredictionLogHandler(path)
    handler.handle(record("before"))
    path.rename(tmp_path / "predictions.jsonl.1")
    handler.handle(record("after"))
    handler.close()
    assert (tmp_path / "predictions.jsonl.1").read_text() == "before\n"
    assert path.read_text() == "after\n" and handler.dropped == 0


def test_a_path_that_cannot_be_opened_at_start_up_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        PredictionLogHandler(tmp_path / "missing" / "predictions.jsonl")


@pytest.mark.skipif(not FULL.exists(), reason="no /dev/full here")
def test_a_server_logging_predictions_to_a_full_device_answers_every_request(tiny_bundle: Path) -> None:
    process, url = start(tiny_bundle, "log.predictions=1.0", f'log.predictions_file="{FULL}"')
    wait_ready(process, url)
    try:
        body = json.dumps({"turns": [{"speaker": "user", "text": "播放周杰伦的歌"}]}).encode()
        for _ in range(20):
            request = urllib.request.Request(f"{url}/predict", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            exposed = response.read().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 30)
    assert "batcher_prediction_log_dropped_total 20.0" in exposed
    assert code == 0 and "Traceback" not in output, output
    assert output.count("prediction log /dev/full: cannot write") == 1, output


def test_a_server_whose_prediction_log_cannot_be_opened_says_so_and_exits_2(tiny_bundle: Path, tmp_path: Path) -> None:
    process, _ = start(tiny_bundle, f'log.predictions_file="{tmp_path / "missing" / "p.jsonl"}"')
    code, output = finish(process, 60)
    assert code == 2 and "cannot open log.predictions_file" in output and "Traceback" not in output, output
    assert not os.path.exists(tmp_path / "missing")
