"""The `batcher` command line: help with examples, the version, settings from the command
line (paths against the current directory), and `check` on a good and a broken bundle."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from batcher import __version__
from batcher.check import run_check
from batcher.cli import build_parser, default_config, from_cwd, main, settings_from
from batcher.config import load_settings
from tests.tiny_model import build_bundle

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [[], ["serve"], ["check"]])
def test_help_says_what_it_does_with_an_example(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: batcher {' '.join(command)}".strip() in out
    assert "examples:" in out and f"batcher {command[0] if command else 'serve'}" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"batcher {__version__}"


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_loadtest_is_the_load_generators_own_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["loadtest", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: batcher loadtest" in out and "classic" in out


def test_default_config_serves_the_bundled_model() -> None:
    settings = load_settings(default_config(), env={})
    assert (settings.model_dir / "tokenizer.json").is_file()


def test_model_dir_and_relative_paths_given_on_the_command_line_resolve_against_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["serve", "mine", "--host", "127.0.0.1", "--port", "9001", "--workers", "2"])
    settings = settings_from(args)
    assert settings.model_dir == tmp_path / "mine"
    assert (settings.server.host, settings.server.port, settings.server.workers) == ("127.0.0.1", 9001, 2)
    args = build_parser().parse_args(["serve", "--set", 'model.path="sub/b"', "--set", "models.extra.path=c"])
    settings = settings_from(args)
    assert settings.model_dir == tmp_path / "sub" / "b"
    assert settings.models[0].directory == tmp_path / "c"


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ('model.path="/abs/bundle"', 'model.path="/abs/bundle"'),
        ("batching.max_batch_size=4", "batching.max_batch_size=4"),
        ('model.file="model.onnx"', 'model.file="model.onnx"'),
        ("model.path=7", "model.path=7"),  # not a path: load_settings names the bad value
        ('model.path="a \\"quoted\\" dir"', 'model.path="/here/a \\"quoted\\" dir"'),
    ],
)
def test_only_relative_model_paths_are_rewritten(item: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")
    assert from_cwd(item) == expected.replace("/here", "")


def test_check_describes_a_good_bundle_and_answers(tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "tiny")
    settings = load_settings(None, env={}, overrides=[f'model.path="{bundle}"', "model.warmup_runs=1"])
    out, err = io.StringIO(), io.StringIO()
    assert run_check(settings, out, err=err) == 0, err.getvalue()
    report = out.getvalue()
    assert f"bundle    {bundle}" in report
    assert "graph     model.onnx" in report and "CPUExecutionProvider" in report
    assert "labels    4 from labels.json: 问题求助/技术支持, 闲聊, 天气查询, 音乐播放" in report
    assert '"intent_name":' in report and report.rstrip().endswith("answers")


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "is not a directory"),
        ("model.onnx", "model.onnx"),
        ("labels.json", "labels"),
    ],
)
def test_check_refuses_a_broken_bundle_in_one_line(tmp_path: Path, breakage: str, message: str) -> None:
    bundle = build_bundle(tmp_path / "tiny")
    if breakage == "missing":
        bundle = tmp_path / "nowhere"
    else:
        (bundle / breakage).write_text("not what it should be")
    settings = load_settings(None, env={}, overrides=[f'model.path="{bundle}"', "model.warmup_runs=1"])
    out, err = io.StringIO(), io.StringIO()
    assert run_check(settings, out, err=err) == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batcher check: ") and message in lines[0], lines
    assert "Traceback" not in err.getvalue() + out.getvalue()


def test_app_py_is_serve_and_passes_the_other_commands_on(tmp_path: Path) -> None:
    bundle = build_bundle(tmp_path / "tiny")
    app = [sys.executable, str(ROOT / "app.py")]
    result = subprocess.run([*app, "check", str(bundle)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout
    result = subprocess.run([*app, "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == f"batcher {__version__}"
