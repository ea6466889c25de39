"""Configuration: TOML file, environment, command line, and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loupelive.config import ConfigError, RelayConfig, describe_config, load_config


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return str(path)


def test_precedence_command_line_over_environment_over_file_over_defaults(tmp_path: Path) -> None:
    file = write(tmp_path, "agent_port = 1111\nviewer_port = 2222\nstream_grace = 1.5\nmax_sessions = 7\n")
    config = load_config(
        file=file,
        environ={"LOUPELIVE_AGENT_PORT": "3333", "LOUPELIVE_VIEWER_PORT": "4444"},
        overrides={"viewer_port": 5555, "host": None},
    )
    assert config.agent_port == 3333  # environment beats the file
    assert config.viewer_port == 5555  # the command line beats the environment
    assert config.stream_grace == 1.5  # the file beats the default
    assert config.max_sessions == 7
    assert config.host == RelayConfig().host  # defaults for the rest


def test_every_option_can_come_from_the_file(tmp_path: Path) -> None:
    default = RelayConfig()
    text = describe_config(default)
    # The description of the defaults is itself a valid configuration file.
    config = load_config(file=write(tmp_path, text), environ={})
    assert config == default


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("agent_port = [\n", "not valid TOML", id="syntax"),
        pytest.param(
            "viewr_port = 1\n", "unknown key 'viewr_port' (did you mean 'viewer_port'?)", id="misspelt"
        ),
        pytest.param("colour = 'blue'\n", "unknown key 'colour'", id="unknown"),
        pytest.param("agent_port = 'x'\n", "key 'agent_port': expected an integer", id="type"),
        pytest.param("insecure = 1\n", "key 'insecure': expected true or false", id="bool-type"),
        pytest.param("agent_port = 70000\n", "agent_port must be 0..65535", id="range"),
        pytest.param("slow_viewer_max_loss = 2.0\n", "slow_viewer_max_loss must be in (0, 1]", id="share"),
        pytest.param("heartbeat_timeout = 1.0\n", "heartbeat_timeout must be longer", id="relation"),
    ],
)
def test_bad_files_name_the_file_the_key_and_the_expectation(tmp_path: Path, text: str, message: str) -> None:
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc_info:
        load_config(file=file, environ={})
    assert str(exc_info.value).startswith(file)
    assert message in str(exc_info.value)


def test_bad_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="LOUPELIVE_STREAM_GRACE: expected a number"):
        load_config(environ={"LOUPELIVE_STREAM_GRACE": "soon"})


def test_secrets_come_from_the_environment_and_are_masked() -> None:
    config = load_config(environ={"LOUPELIVE_AGENT_TOKEN": "a-secret", "LOUPELIVE_VIEWER_TOKEN": "v-secret"})
    assert config.agent_token == "a-secret"
    shown = describe_config(config)
    assert "a-secret" not in shown
    assert "v-secret" not in shown
    assert 'agent_token = "********"' in shown


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loupelive", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_check_config_prints_the_effective_configuration(tmp_path: Path) -> None:
    file = write(tmp_path, "agent_port = 1111\nviewer_token = 'file-secret'\n")
    result = run_serve("--config", file, "--viewer-port", "2222", "--check-config")
    assert result.returncode == 0, result.stderr
    assert "agent_port = 1111" in result.stdout
    assert "viewer_port = 2222" in result.stdout
    assert "file-secret" not in result.stdout
    assert 'viewer_token = "********"' in result.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("viewr_port = 1\n", "did you mean 'viewer_port'", id="misspelt"),
        pytest.param("agent_port = 'x'\n", "expected an integer", id="type"),
        pytest.param("agent_port = [\n", "not valid TOML", id="syntax"),
    ],
)
def test_serve_with_a_bad_file_stops_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    file = write(tmp_path, text)
    result = run_serve("--config", file)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"loupelive: {file}")
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_public_address_without_protection() -> None:
    result = run_serve("--host", "0.0.0.0", "--check-config")
    assert result.returncode == 2
    assert "--insecure" in result.stderr
    assert "Traceback" not in result.stderr
