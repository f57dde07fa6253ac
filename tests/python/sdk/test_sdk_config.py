"""Which server and key the SDK uses: the CLI's resolution, and the local key file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import openrun
from openrun import Sandbox
from openrun._config import resolve


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No server or key from the environment, an empty home and data dir."""
    for name in ("OPENRUN_SERVER", "OPENRUN_API_KEY", "OPENRUN_CONFIG", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OPENRUN_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    return tmp_path


def test_environment_variables(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, server_url: str, api_key: str
) -> None:
    monkeypatch.setenv("OPENRUN_SERVER", server_url)
    monkeypatch.setenv("OPENRUN_API_KEY", api_key)
    with Sandbox.create() as sandbox:
        assert sandbox.server == server_url
        assert sandbox.run("echo env").stdout == "env\n"


def test_config_file(clean_env: Path, monkeypatch: pytest.MonkeyPatch, server_url: str, api_key: str) -> None:
    config = clean_env / "home" / ".config" / "openrun" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"server": server_url, "api_key": api_key}))
    target = resolve()
    assert (target.url, target.api_key) == (server_url, api_key)
    assert api_key not in repr(target)
    assert isinstance(Sandbox.list(), list)


def test_config_key_goes_only_to_its_server(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, server_url: str
) -> None:
    config = clean_env / "cfg.json"
    config.write_text(json.dumps({"server": "http://10.9.8.7:7878", "api_key": "or_other"}))
    monkeypatch.setenv("OPENRUN_CONFIG", str(config))
    assert resolve().url == "http://10.9.8.7:7878"
    monkeypatch.setenv("OPENRUN_SERVER", server_url)
    assert resolve().api_key is None
    with pytest.raises(openrun.AuthenticationError):
        Sandbox.list()


def test_local_key_file_of_a_loopback_server(clean_env: Path, server_url: str, api_key: str) -> None:
    local = clean_env / "data" / "local.json"
    local.write_text(json.dumps({"server": server_url, "api_key": api_key}))
    # No server configured anywhere: the local server of the data dir is used, with its key.
    assert resolve() == resolve(server=server_url)
    assert resolve().api_key == api_key
    with Sandbox.create() as sandbox:
        assert sandbox.run("true").exit_code == 0
    # Another port of loopback never gets that key.
    port = int(server_url.rsplit(":", 1)[1])
    assert resolve(server=f"http://127.0.0.1:{port + 1}").api_key is None
    assert resolve(server=f"localhost:{port}").api_key == api_key


def test_explicit_arguments_win(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENRUN_SERVER", "http://127.0.0.1:5")
    monkeypatch.setenv("OPENRUN_API_KEY", "or_env")
    target = resolve(server="127.0.0.1:6", api_key="or_arg")
    assert (target.url, target.api_key) == ("http://127.0.0.1:6", "or_arg")
    assert resolve().api_key == "or_env"


def test_configuration_errors(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(openrun.ConfigurationError, match="no openrun server"):
        resolve()
    for bad in ("https://x:1", "http://x/v1", "ftp://x", "http://u@x:1"):
        with pytest.raises(openrun.ConfigurationError, match="invalid server address"):
            resolve(server=bad)
    monkeypatch.setenv("OPENRUN_CONFIG", str(clean_env / "missing.json"))
    with pytest.raises(openrun.ConfigurationError, match="missing.json"):
        resolve(server="http://127.0.0.1:1")
    (clean_env / "bad.json").write_text("not json")
    monkeypatch.setenv("OPENRUN_CONFIG", str(clean_env / "bad.json"))
    with pytest.raises(openrun.ConfigurationError, match="invalid config file"):
        resolve(server="http://127.0.0.1:1")


def test_the_local_server_gets_only_its_own_key(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, server_url: str, api_key: str
) -> None:
    # No server named anywhere: the local.json fallback. A key meant for some other server
    # ($OPENRUN_API_KEY, or a config file's key) is never sent to whatever listens locally.
    local = clean_env / "data" / "local.json"
    local.write_text(json.dumps({"server": server_url, "api_key": api_key}))
    monkeypatch.setenv("OPENRUN_API_KEY", "or_meant_for_another_server")
    config = clean_env / "cfg.json"
    config.write_text(json.dumps({"api_key": "or_from_the_config_file"}))
    monkeypatch.setenv("OPENRUN_CONFIG", str(config))
    target = resolve()
    assert (target.url, target.api_key) == (server_url, api_key)
    assert isinstance(Sandbox.list(), list)
    # An explicit key is the caller's choice, and a named server gets the usual keys.
    assert resolve(api_key="or_explicit").api_key == "or_explicit"
    monkeypatch.setenv("OPENRUN_SERVER", server_url)
    assert resolve().api_key == "or_meant_for_another_server"
    # Without local.json's key, the fallback sends none.
    monkeypatch.delenv("OPENRUN_SERVER")
    local.write_text(json.dumps({"server": server_url}))
    assert resolve().api_key is None
