from __future__ import annotations

from pathlib import Path

import pytest

from batcher.config import load_settings
from batcher.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_config_loads_and_matches_defaults() -> None:
    settings = load_settings(ROOT / "config.toml", env={})
    assert settings.batching.max_batch_size == 32
    assert settings.batching.instances == 2
    assert settings.server.port == 8000
    assert settings.model_dir == ROOT / "models" / "intent-zh"


def test_precedence_file_then_env_then_set(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[batching]\nmax_wait_s = 0.003\nmax_batch_size = 8\n")
    settings = load_settings(
        path,
        env={"BATCHER_BATCHING__MAX_WAIT_S": "0.004", "BATCHER_BATCHING__MAX_BATCH_SIZE": "16", "OTHER": "x"},
        overrides=["batching.max_batch_size=1"],
    )
    assert settings.batching.max_wait_s == 0.004
    assert settings.batching.max_batch_size == 1


def test_relative_model_path_resolves_against_config_dir(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[model]\npath = "bundle"\n')
    assert load_settings(path, env={}).model_dir == tmp_path / "bundle"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batching.max_batch_sise=4"], "unknown key batching.max_batch_sise"),
        (["nope.key=1"], "unknown section [nope]"),
        (["batching.max_batch_size=0"], "batching.max_batch_size = 0 is out of range"),
        (["batching.max_batch_size=true"], "batching.max_batch_size = True must be of type int"),
        (["batching.max_wait_s=fast"], "batching.max_wait_s = 'fast' must be of type float"),
        (["model.device=tpu"], "model.device = 'tpu' is not allowed; allowed values: 'auto', 'cpu', 'cuda'"),
        (["max_batch_size"], "expected section.key=value"),
        (['server.cors_allow_origins="app.example.com"'], "'app.example.com' is not an origin"),
        (['server.cors_allow_origins="https://a.example/path"'], "is not an origin"),
    ],
)
def test_bad_settings_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, env={}, overrides=overrides)
    assert message in str(info.value)


def test_cors_origins_parse_and_default_off() -> None:
    assert load_settings(None, env={}).server.cors_origins == ()
    value = '"https://a.example, http://localhost:3000,https://a.example, http://[::1]:8080"'
    settings = load_settings(None, env={}, overrides=[f"server.cors_allow_origins={value}"])
    assert settings.server.cors_origins == ("https://a.example", "http://localhost:3000", "http://[::1]:8080")
    assert load_settings(None, env={"BATCHER_SERVER__CORS_ALLOW_ORIGINS": "*"}).server.cors_origins == ("*",)


def test_bad_env_key_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment BATCHER_SERVER__PROT"):
        load_settings(None, env={"BATCHER_SERVER__PROT": "1"})


def test_unknown_key_in_file_names_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[server]\nportt = 1\n")
    with pytest.raises(ConfigError, match=r"c\.toml: unknown key server\.portt; allowed: "):
        load_settings(path, env={})


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad, env={})


def test_describe_is_flat() -> None:
    flat = load_settings(None, env={}).describe()
    assert flat["batching.max_wait_s"] == "0.002"
    assert flat["model.device"] == "auto"


def test_every_setting_is_in_the_shipped_config() -> None:
    text = (ROOT / "config.toml").read_text()
    flat = load_settings(None, env={}).describe()
    # A key is documented set to its default, or commented out where its default is "unset".
    documented = {line.removeprefix("# ").split("=")[0].strip() for line in text.splitlines() if " = " in line}
    missing = [key for key in flat if key.split(".")[-1] not in documented]
    assert not missing, f"config.toml does not document {missing}"


def test_millisecond_names_still_work_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[batching]\nmax_wait_ms = 3\n")
    with pytest.warns(FutureWarning) as warned:
        settings = load_settings(path, env={"BATCHER_BATCHING__REQUEST_TIMEOUT_MS": "1500"})
    assert [str(w.message) for w in warned] == [
        f"{path}: batching.max_wait_ms is deprecated; use batching.max_wait_s = 0.003",
        "environment BATCHER_BATCHING__REQUEST_TIMEOUT_MS: batching.request_timeout_ms is deprecated; "
        "use batching.request_timeout_s = 1.5",
    ]
    assert settings.batching.max_wait_s == pytest.approx(0.003)
    assert settings.batching.request_timeout_s == pytest.approx(1.5)
    with pytest.raises(ConfigError, match="max_wait_ms = 'soon' must be a number"):
        load_settings(None, env={}, overrides=["batching.max_wait_ms=soon"])
