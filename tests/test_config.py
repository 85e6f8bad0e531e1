"""Config loading: every error names the file and the key path; secrets never print."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudtaskd.config import Config, Secret, load_config
from cloudtaskd.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_example_config_is_valid_and_equals_the_defaults() -> None:
    loaded = load_config(ROOT / "config.example.yaml")
    assert loaded.agents == Config().agents
    assert loaded.queue == Config().queue
    assert loaded.scaling == Config().scaling
    assert loaded.providers == Config().providers


@pytest.mark.parametrize(("text", "key", "expected"), [
    ("agents:\n  lease_ttl_s: fast\n", "agents.lease_ttl_s", "expected a number"),
    ("agents:\n  lease_ttl: 5\n", "agents.lease_ttl", "unknown key"),
    ("queue:\n  max_attempts: 0\n", "queue.max_attempts", "between 1 and 100"),
    ("queue:\n  max_attempts: 2.5\n", "queue.max_attempts", "whole number"),
    ("providers:\n  local:\n    enabled: yes please\n", "providers.local.enabled", "true or false"),
    ("log_level: loud\n", "log_level", "expected one of"),
    ("scaling: 3\n", "scaling", "expected a mapping"),
    ("state_dir: ${CLOUDTASK_TEST_UNSET_VAR}\n", "state_dir", "CLOUDTASK_TEST_UNSET_VAR is not set"),
    ("agents: [1,\n", "line 2", "not valid YAML"),
])
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}:"), message
    assert expected in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_environment_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CT_STATE", str(tmp_path / "s"))
    assert load_config(write(tmp_path, "state_dir: ${CT_STATE}\n")).state_path == tmp_path / "s"


def test_secret_never_shows_itself() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in repr({"k": secret})
    assert secret.reveal() == "hunter2"


def test_aws_secrets_are_hidden_in_the_config_repr(tmp_path: Path) -> None:
    path = write(tmp_path, "providers:\n  aws:\n    access_key: AKIAEXAMPLE\n    secret_key: s3cr3t-value\n")
    config = load_config(path)
    assert config.providers.aws.secret_key.reveal() == "s3cr3t-value"
    text = repr(config)
    assert "s3cr3t-value" not in text and "AKIAEXAMPLE" not in text and "<SECRET>" in text
