"""Config loading: every error names the file and the key path; secrets never print."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from cloudtaskd import redact
from cloudtaskd.config import Config, Secret, load_config
from cloudtaskd.errors import ConfigError
from tests import paths

ROOT = paths.ROOT
EXAMPLE = ROOT / "config.example.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.fixture(autouse=True)
def _forget_secrets() -> Iterator[None]:
    """load_config registers secrets process-wide; each test starts and ends with none."""
    redact.forget_all()
    yield
    redact.forget_all()


def test_example_config_is_valid_and_equals_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    text = EXAMPLE.read_text()
    active = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for name in set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", active)):  # none today; if one is used
        monkeypatch.setenv(name, "")
    loaded = load_config(EXAMPLE)
    assert loaded.warnings == ()
    assert replace(loaded, source=Config().source) == Config()


# Each row: a config, the key path its error must name, and what the error must say. Every error
# reads "<file>: <key path>: <what was expected>".
ERRORS = [
    # wrong types, one per kind of value
    ("state_dir: [a]\n", "state_dir", "expected a string, got a list ['a']"),
    ("state_dir:\n", "state_dir", "expected a string, got nothing"),
    ("providers:\n  aws:\n    machine_type: 5\n", "providers.aws.machine_type", "got a whole number 5 (quote it"),
    ("scaling:\n  max_instances: many\n", "scaling.max_instances", "expected a whole number, got a string 'many'"),
    ("scaling:\n  max_instances: true\n", "scaling.max_instances", "expected a whole number, got true/false"),
    ("queue:\n  max_attempts: 2.5\n", "queue.max_attempts", "whole number"),
    ("agents:\n  lease_ttl_s: fast\n", "agents.lease_ttl_s", "expected a number"),
    ("agents:\n  lease_ttl_s: .nan\n", "agents.lease_ttl_s", "expected a finite number"),
    ("queue:\n  max_attempts: .inf\n", "queue.max_attempts", "expected a finite number"),
    ("providers:\n  local:\n    enabled: yes please\n", "providers.local.enabled", "true or false"),
    ("providers:\n  aws:\n    zones: us-east-1a\n", "providers.aws.zones", "expected a list, got a string"),
    ("providers:\n  aws:\n    zones: [1]\n", "providers.aws.zones[0]", "expected a string"),
    ("scaling: 3\n", "scaling", "expected a mapping"),
    ("providers:\n  ssh:\n    hosts: [10.0.0.5]\n", "providers.ssh.hosts[0]", "expected a mapping, got a string"),
    # ranges and choices
    ("queue:\n  max_attempts: 0\n", "queue.max_attempts", "must be between 1 and 100, got 0"),
    ("agents:\n  listen_port: 70000\n", "agents.listen_port", "between 0 and 65535"),
    ("api:\n  rate_limit_per_s: 0\n", "api.rate_limit_per_s", "between 0.1 and 1000000"),
    ("log_level: loud\n", "log_level", "expected one of debug, info, warning, error, got 'loud'"),
    ("providers:\n  local:\n    interruption_source: ec2\n", "providers.local.interruption_source",
     'expected one of "", aws, gcp, azure'),
    # unknown keys: top level, nested, inside a list item
    ("bogus: 1\n", "bogus", "unknown key (expected one of: agents, api,"),
    ("agents:\n  lease_ttl: 5\n", "agents.lease_ttl", "unknown key (did you mean lease_ttl_s?"),
    ("providers:\n  ssh:\n    hosts:\n      - address: h\n        bogus: 1\n", "providers.ssh.hosts[0].bogus",
     "unknown key"),
    # the file itself
    ("agents: [1,\n", "line 2", "not valid YAML"),
    ("providers:\n  aws:\n    enabled: false\n  aws:\n    enabled: true\n", "line 4",
     "duplicate key 'aws' (first on line 2)"),
    ("- a\n- b\n", "(top level)", "expected a mapping, got a list"),
    ("just words\n", "(top level)", "expected a mapping, got a string"),
    ("1: x\n", "(top level)", "keys must be names, got a whole number 1"),
    ("providers:\n  null: x\n", "providers", "keys must be names, got nothing"),
    (b"state_dir: /tmp\nlog_level: \xff\n", "line 2", "not UTF-8 text"),
    # the environment
    ("state_dir: ${CLOUDTASK_TEST_UNSET_VAR}\n", "state_dir", "CLOUDTASK_TEST_UNSET_VAR is not set"),
    ("api:\n  token: ${CLOUDTASK_TEST_UNSET_VAR}\n", "api.token", "environment variable CLOUDTASK_TEST_UNSET_VAR"),
    # keys that need each other (checked after the types)
    ("api:\n  listen: 127.0.0.1:8443\n", "api.token", "required with api.listen"),
    ("api:\n  listen: 127.0.0.1:8443\n  token: short\n", "api.token", "at least 16 characters, got 5"),
    ("api:\n  listen: '8443'\n  token: 0123456789abcdef\n", "api.listen", "expected host:port"),
    ("api:\n  listen: 127.0.0.1:70000\n  token: 0123456789abcdef\n", "api.listen", "port from 0 to 65535"),
    ("api:\n  listen: ::1:8443\n  token: 0123456789abcdef\n", "api.listen", "[::1]:8443"),
    ("api:\n  tls_cert: /etc/c.pem\n", "api.tls_key", "required with api.tls_cert"),
    ("api:\n  tls_key: /etc/k.pem\n", "api.tls_cert", "required with api.tls_key"),
    ("agents:\n  public_url: http://h:1/v1/agent\n", "agents.public_url", "expected a ws:// or wss:// URL"),
    ("agents:\n  public_url: wss://h:99999/v1/agent\n", "agents.public_url", "expected a ws:// or wss:// URL"),
    ("agents:\n  public_url: ws://h:1/v1/agent\n", "agents.public_url", "agents.tls is on"),
    # Machines elsewhere would dial their own loopback: refused, naming what to set instead.
    ("agents:\n  public_url: wss://127.0.0.1:9/v1/agent\nproviders:\n  ssh:\n    hosts:\n"
     "      - {address: 10.0.0.5, key_file: k}\n", "agents.public_url",
     "a loopback address, which the machines of providers.ssh cannot reach"),
    ("agents:\n  public_url: wss://localhost:9/v1/agent\nproviders:\n  aws:\n    enabled: true\n",
     "agents.public_url", "machines of providers.aws cannot reach"),
    # every replica's agent URL (issue 17): each entry named by its index
    ("agents:\n  urls: [wss://a:1/v1/agent, https://b:1/v1/agent]\n", "agents.urls[1]",
     "expected a ws:// or wss:// URL with a host (agents dial it), got 'https://b:1/v1/agent'"),
    ("agents:\n  urls: [ws://a:1/v1/agent]\n", "agents.urls[0]", "agents.tls is on, so agents dial wss://"),
    ("agents:\n  urls: [wss://a:1/v1/agent, wss://b:1/v1/agent, wss://a:1/v1/agent]\n", "agents.urls[2]",
     "'wss://a:1/v1/agent' is listed twice (agents.urls[0] too)"),
    ("agents:\n  urls: wss://a:1/v1/agent\n", "agents.urls", "expected a list"),
    ("agents:\n  public_url: wss://a:1/v1/agent\n  urls: [wss://a:1/v1/agent, 'wss://[::1]:2/v1/agent']\n"
     "providers:\n  aws:\n    enabled: true\n", "agents.urls[1]",
     "a loopback address, which the machines of providers.aws cannot reach: set the replica's address"),
    # an accepted task must fit in a frame to the agents (issue 13)
    ("agents:\n  max_message_bytes: 1048576\n", "agents.max_message_bytes",
     "must be at least queue.max_task_bytes + 8192 (1056768), so that every task an upload accepts can be "
     "delivered to an agent; got 1048576 (leave it out to follow queue.max_task_bytes)"),
    ("agents:\n  max_message_bytes: 500\n", "agents.max_message_bytes", "must be at least queue.max_task_bytes"),
    ("queue:\n  max_task_bytes: 8388608\nagents:\n  max_message_bytes: 4194304\n", "agents.max_message_bytes",
     "(8396800)"),
    ("queue:\n  max_task_bytes: 100\n", "queue.max_task_bytes", "must be between 1024 and"),
    ("queue:\n  retry_backoff_s: 10\n  retry_backoff_max_s: 5\n", "queue.retry_backoff_max_s",
     "must be at least queue.retry_backoff_s (10), got 5"),
    ("providers:\n  ssh:\n    hosts:\n      - key_file: /k\n", "providers.ssh.hosts[0].address", "required"),
    ("providers:\n  ssh:\n    hosts:\n      - address: h\n", "providers.ssh.hosts[0].key_file", "required"),
    ("providers:\n  ssh:\n    hosts:\n      - {address: h, key_file: /k}\n      - {address: h, key_file: /j}\n",
     "providers.ssh.hosts[1]", "the same host as providers.ssh.hosts[0] (h:22)"),
    ("providers:\n  aws:\n    enabled: true\n    region: ''\n", "providers.aws.region",
     "required when providers.aws.enabled is true"),
    ("providers:\n  aws:\n    enabled: true\n    access_key: AKIAEXAMPLEEXAMPLE\n", "providers.aws.secret_key",
     "required with providers.aws.access_key"),
    ("providers:\n  aws:\n    enabled: true\n    subnet_id: vpc-0abc\n", "providers.aws.subnet_id",
     "expected a subnet id (subnet-...), got 'vpc-0abc'"),
    ("providers:\n  aws:\n    enabled: true\n    subnet_id: subnet-0abc\n    zones: [us-east-1b]\n",
     "providers.aws.zones", "a subnet lies in one zone"),
    ("providers:\n  aws:\n    enabled: true\n    security_group_id: cloudtask-ssh\n", "providers.aws.security_group_id",
     "expected a security group id (sg-...)"),
    ("providers:\n  gcp:\n    enabled: true\n", "providers.gcp.project_id", "required when providers.gcp.enabled"),
    ("providers:\n  azure:\n    enabled: true\n", "providers.azure.subscription_id", "required when"),
    ("providers:\n  azure:\n    enabled: true\n    subscription_id: s\n    tenant_id: t\n",
     "providers.azure.client_id", "give tenant_id, client_id, client_secret together"),
]


@pytest.mark.parametrize(("text", "key", "expected"), ERRORS, ids=[f"{i}-{row[1]}" for i, row in enumerate(ERRORS)])
def test_errors_name_file_and_key(tmp_path: Path, text: str | bytes, key: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert expected in message, message
    assert (info.value.source, info.value.key) == (str(path), key)


@pytest.mark.parametrize("text", [
    "",
    "# only comments\n",
    "---\n",
    "providers:\n  aws:\n    access_key: x\n",  # a disabled cloud's keys are not checked together
    "api:\n  listen: '[::1]:0'\n  token: 0123456789abcdef\n",
    "providers:\n  gcp:\n    enabled: true\n    project_id: p\n",
    "providers:\n  aws:\n    enabled: true\n    subnet_id: subnet-0abc\n    security_group_id: sg-0abc\n",
    "providers:\n  aws:\n    enabled: true\n    subnet_id: subnet-0abc\n",  # the SSH group is made in its VPC
])
def test_configs_that_load(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, text))
    assert config.source == str(tmp_path / "config.yaml")
    if not text.strip("-\n") or text.startswith("#"):
        assert replace(config, source=Config().source) == Config(), "an empty file gives the defaults"


def test_the_agents_frame_limit_follows_the_task_limit(tmp_path: Path) -> None:
    """Raising queue.max_task_bytes raises the frame limit with it (the agents the daemon starts read
    frames that large), unless the file sets that limit itself, high enough."""
    assert Config().agents.max_message_bytes == 4 * 1024 * 1024
    config = load_config(write(tmp_path, "queue:\n  max_task_bytes: 8388608\n"))
    assert config.agents.max_message_bytes == 8388608 + 8192
    config = load_config(write(tmp_path, "queue:\n  max_task_bytes: 2048\n"))
    assert config.agents.max_message_bytes == 4 * 1024 * 1024  # never below the default
    config = load_config(write(tmp_path, "agents:\n  max_message_bytes: 9000000\nqueue:\n  max_task_bytes: 8388608\n"))
    assert config.agents.max_message_bytes == 9000000


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r": \(file\): cannot read: Is a directory$"):
        load_config(tmp_path)
    path = write(tmp_path, "log_level: info\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads anything
            pytest.skip("running as root: mode 000 does not stop a read")
        with pytest.raises(ConfigError, match=r": \(file\): cannot read: Permission denied$"):
            load_config(path)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(("text", "value"), [
    ("api:\n  token: [hunter2-secret-value]\n", "hunter2"),
    ("providers:\n  aws:\n    secret_key: 987654321987654321\n", "987654321"),
    ("providers:\n  azure:\n    client_secret: {s: hunter2-secret-value}\n", "hunter2"),
    ("api:\n  listen: 127.0.0.1:1\n  token: hunter2\n", "hunter2"),
])
def test_errors_never_show_a_secret(tmp_path: Path, text: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert value not in str(info.value)
    assert "api.token" in str(info.value) or "secret" in str(info.value)


def test_warnings_for_what_works_but_is_probably_wrong(tmp_path: Path) -> None:
    path = write(tmp_path, (
        "api:\n  token: 0123456789abcdef\n"
        "agents:\n  tls: false\n  listen_host: 0.0.0.0\n"
        "providers:\n  local:\n    enabled: false\n  gcp:\n    enabled: true\n    project_id: p\n"
        "    max_instances: 0\n"
    ))
    path.chmod(0o600)  # the token is written in the file: only the owner may read it
    config = load_config(path)
    events = {w.event: w for w in config.warnings}
    assert set(events) == {"config_keys_unused", "config_agents_plaintext", "config_cloud_unused",
                           "config_no_instances"}
    assert events["config_keys_unused"].keys == ("api.token",)
    assert events["config_cloud_unused"].keys == ("providers.gcp.max_instances",)
    assert "0123456789abcdef" not in repr(config.warnings)
    assert load_config(write(tmp_path, "agents:\n  tls: false\n")).warnings == (), "loopback is fine"


def test_agents_are_given_this_daemons_url_first_then_every_other_replicas(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "agents:\n  urls: [wss://a:1/v1/agent, wss://b:1/v1/agent]\n"))
    assert config.agents.urls == ("wss://a:1/v1/agent", "wss://b:1/v1/agent")
    assert config.agents.dial_urls("wss://b:1/v1/agent") == ("wss://b:1/v1/agent", "wss://a:1/v1/agent")
    assert config.agents.dial_urls("wss://c:1/v1/agent") == ("wss://c:1/v1/agent", "wss://a:1/v1/agent",
                                                             "wss://b:1/v1/agent")
    assert load_config(write(tmp_path, "")).agents.dial_urls("wss://c:1/v1/agent") == ("wss://c:1/v1/agent",)
    # A loopback replica is fine for local agents, and tunnelled agents are given their tunnel only:
    # loaded, with a warning that they do not get the list.
    tunnelled = load_config(write(tmp_path, "agents:\n  urls: [wss://127.0.0.1:1/v1/agent]\n"
                                            "providers:\n  aws:\n    enabled: true\n    region: r\n"
                                            "    machine_type: m\n"))
    (warning,) = [w for w in tunnelled.warnings if w.event == "config_agents_urls_tunnelled"]
    assert warning.keys == ("agents.urls", "agents.public_url") and "given their tunnel only" in warning.message


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


# A key in the example: `key:` or `- key:`, or the same inside a commented-out example, written as
# `#` then two or more spaces (`#  - address: 10.0.0.5`); prose comments have one space after `#`.
_KEY = re.compile(r"(?P<indent> *)(?P<dash>- )?(?P<key>[a-z][a-z0-9_]*):(\s|$)")
_COMMENTED_KEY = re.compile(r" *# {2,}(?P<dash>- )?(?P<key>[a-z][a-z0-9_]*):(\s|$)")


def config_keys(cls: type[Any], prefix: str = "") -> dict[str, bool]:
    """Every key path of the config dataclasses -> whether it is a section (a mapping). Items of a
    list of mappings are `path[].key`."""
    out: dict[str, bool] = {}
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.metadata.get("internal"):
            continue
        hint, path = hints[f.name], prefix + f.name
        item = get_args(hint)[0] if get_origin(hint) is tuple else None
        if is_dataclass(hint):
            out[path] = True
            out.update(config_keys(hint, path + "."))  # type: ignore[arg-type]
        elif item is not None and is_dataclass(item):
            out[path] = False
            out.update(config_keys(item, path + "[]."))  # type: ignore[arg-type]
        else:
            out[path] = False
    return out


def example_keys(text: str) -> dict[str, bool]:
    """Every key path the example shows (commented-out examples included) -> whether it has a comment
    of its own: on its line, or on the line right above (not across a blank line)."""
    found: dict[str, bool] = {}
    stack: list[tuple[float, str]] = []  # (column of the key, its path); a list item adds (column - 0.5, path[])
    previous = ""
    for line in text.splitlines():
        commented = _COMMENTED_KEY.match(line)
        m = commented or (None if line.lstrip().startswith("#") else _KEY.match(line))
        if m is not None:
            col = m.start("key")
            while stack and stack[-1][0] >= col:
                stack.pop()
            parent = stack[-1][1] if stack else ""
            if m.group("dash"):
                parent += "[]"
                stack.append((col - 0.5, parent))
            path = f"{parent}.{m.group('key')}" if parent else m.group("key")
            stack.append((col, path))
            inline = "#" in line[m.end():]
            above = previous.lstrip().startswith("#") and _COMMENTED_KEY.match(previous) is None
            found[path] = inline or (above and commented is None)
        previous = line
    return found


def test_example_documents_every_key_with_a_comment() -> None:
    """A new config key fails here until config.example.yaml shows it with a comment."""
    expected = config_keys(Config)
    shown = example_keys(EXAMPLE.read_text())
    missing = sorted(set(expected) - set(shown))
    stale = sorted(set(shown) - set(expected))
    undocumented = sorted(k for k, documented in shown.items() if not documented and not expected.get(k, True))
    assert not missing, f"config.example.yaml lacks these keys: {missing}"
    assert not stale, f"config.example.yaml shows keys the config does not have: {stale}"
    assert not undocumented, f"config.example.yaml shows these keys without a comment: {undocumented}"


def test_the_example_key_scanner_sees_what_it_should() -> None:
    """The scanner behind the test above: an undocumented, a missing and a commented-out key are seen."""
    shown = example_keys(
        "# prose: a comment\n"
        "api:\n"
        "  # the socket\n"
        "  socket: ''\n"
        "\n"
        "  listen: ''\n"
        "providers:\n"
        "  ssh:\n"
        "    hosts: []        # machines\n"
        "    #  - address: h  # its address\n"
        "    #    port: 22\n"
    )
    assert shown == {"api": True, "api.socket": True, "api.listen": False, "providers": False,
                     "providers.ssh": False, "providers.ssh.hosts": True, "providers.ssh.hosts[].address": True,
                     "providers.ssh.hosts[].port": False}
    assert "providers.ssh.hosts[].host_key" in config_keys(Config)


def test_the_commented_out_examples_in_the_example_load(tmp_path: Path) -> None:
    """`hosts: []` followed by a commented-out host: uncommented, that host must be a valid config."""
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.endswith(": []") and _COMMENTED_KEY.match(lines[i + 1]):
            lines[i] = line.removesuffix(" []")
            j = i + 1
            while j < len(lines) and lines[j].lstrip().startswith("#  "):
                lines[j] = lines[j].replace("#", " ", 1)
                j += 1
    text = "\n".join(lines) + "\n"
    assert text != EXAMPLE.read_text(), "the example has no commented-out example left to check"
    config = load_config(write(tmp_path, text))
    [host] = config.providers.ssh.hosts
    assert host.address == "10.0.0.5" and host.port == 22 and host.cpus == 8
    assert host.key_file and host.host_key.startswith("ssh-ed25519 ")


SECRETS_IN_FILE = (
    "api:\n  token: literal-api-token-0123456789\n"
    "providers:\n  aws:\n    secret_key: literal-aws-secret-key\n"
    "  azure:\n    client_secret: ${CT_TEST_AZURE_SECRET}\n"
)


def readable_warning(config: Config) -> Any:
    found = [w for w in config.warnings if w.event == "config_secrets_readable"]
    return found[0] if found else None


@pytest.mark.parametrize(("mode", "warned"), [
    (0o600, False),
    (0o400, False),
    (0o640, False),  # the file's group is the daemon's own (the service layout: root:cloudtask 0640)
    (0o644, True),
    (0o604, True),
    (0o666, True),
])
def test_secrets_in_a_file_others_can_read_are_warned_about(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, warned: bool) -> None:
    monkeypatch.setenv("CT_TEST_AZURE_SECRET", "azure-secret-from-env")
    path = write(tmp_path, SECRETS_IN_FILE)
    path.chmod(mode)
    assert os.stat(path).st_gid == os.getegid()
    warning = readable_warning(load_config(path))
    if not warned:
        assert warning is None
        return
    assert warning is not None
    # Only the secrets written in the file; the one from ${VAR} is where it should be.
    assert warning.keys == ("api.token", "providers.aws.secret_key")
    assert dict(warning.extra) == {"mode": f"{mode:04o}"}
    assert str(path) in warning.message and "${VAR}" in warning.message and "every user" in warning.message
    for value in ("literal-api-token", "literal-aws-secret", "azure-secret-from-env"):
        assert value not in repr(warning)


def test_secrets_readable_by_another_group_are_warned_about(tmp_path: Path) -> None:
    path = write(tmp_path, SECRETS_IN_FILE.replace("${CT_TEST_AZURE_SECRET}", "''"))
    path.chmod(0o640)
    # root may give the file to any group; another user only to a group of its own.
    groups = [1, 2] if os.geteuid() == 0 else os.getgroups()
    other = next((g for g in groups if g != os.getegid()), None)
    if other is None:
        pytest.skip("no other group to give the file to")
    os.chown(path, -1, other)
    warning = readable_warning(load_config(path))
    assert warning is not None and f"group {other}" in warning.message
    path.chmod(0o600)
    assert readable_warning(load_config(path)) is None


@pytest.mark.parametrize(("value", "literal"), [
    ("${CT_TEST_A}", False),
    ("${CT_TEST_A}${CT_TEST_B}", False),
    ("''", False),
    ("prefix-${CT_TEST_A}", True),  # part of the secret is in the file
    ("written-here-0123", True),
])
def test_what_counts_as_a_secret_written_in_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, literal: bool) -> None:
    monkeypatch.setenv("CT_TEST_A", "aaaaaaaa")
    monkeypatch.setenv("CT_TEST_B", "bbbbbbbb")
    path = write(tmp_path, f"providers:\n  azure:\n    client_secret: {value}\n")
    path.chmod(0o644)
    warning = readable_warning(load_config(path))
    assert (warning is not None) == literal
    if literal:
        assert warning.keys == ("providers.azure.client_secret",)


def test_the_readable_warning_is_logged_without_values(tmp_path: Path) -> None:
    from structlog.testing import capture_logs

    from cloudtaskd.logs import log_config_warnings

    path = write(tmp_path, SECRETS_IN_FILE.replace("${CT_TEST_AZURE_SECRET}", "''"))
    path.chmod(0o644)
    config = load_config(path)
    with capture_logs() as logs:
        log_config_warnings(config)
    [line] = [e for e in logs if e["event"] == "config_secrets_readable"]
    assert line["log_level"] == "warning" and line["file"] == str(path) and line["mode"] == "0644"
    assert line["keys"] == ["api.token", "providers.aws.secret_key"]
    assert "literal-" not in repr(logs)


# The original spec's form (issue 15): a top-level section per cloud, which enables it.
SEED_AWS = "aws:\n  access_key: AKIASEEDEXAMPLE\n  secret_key: ${CT_SEED_AWS_SECRET}\n  region: eu-west-1\n"
SEED_GCP = "gcp:\n  project_id: seed-project\n  credentials_file: /etc/cloudtask/gcp.json\n"
SEED_AZURE = ("azure:\n  subscription_id: sub-1\n  tenant_id: tenant-1\n  client_id: client-1\n"
              "  client_secret: ${CT_SEED_AZURE_SECRET}\n")


@pytest.fixture
def seed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CT_SEED_AWS_SECRET", "seed-aws-secret-value")
    monkeypatch.setenv("CT_SEED_AZURE_SECRET", "seed-azure-secret-value")


def test_the_seed_aws_section_is_providers_aws(tmp_path: Path, seed_env: None) -> None:
    config = load_config(write(tmp_path, SEED_AWS))
    aws = config.providers.aws
    assert aws.enabled and aws.region == "eu-west-1"
    assert aws.access_key.reveal() == "AKIASEEDEXAMPLE" and aws.secret_key.reveal() == "seed-aws-secret-value"
    assert not config.providers.gcp.enabled and not config.providers.azure.enabled
    assert config.seed_sections == ("aws",)
    # The same config as the providers form gives, but for where it was written.
    providers_form = load_config(write(tmp_path, "providers:\n" + "".join(
        f"  {line}\n" for line in (SEED_AWS + "  enabled: true\n").splitlines())))
    assert config.providers == providers_form.providers
    assert [w.keys for w in config.warnings] == [("aws.access_key",)], "named as written"
    assert [w.keys for w in providers_form.warnings] == [("providers.aws.access_key",)]


def test_the_seed_gcp_section_is_providers_gcp(tmp_path: Path) -> None:
    gcp = load_config(write(tmp_path, SEED_GCP)).providers.gcp
    assert gcp.enabled and gcp.project_id == "seed-project" and gcp.credentials_file == "/etc/cloudtask/gcp.json"


def test_the_seed_azure_section_is_providers_azure(tmp_path: Path, seed_env: None) -> None:
    azure = load_config(write(tmp_path, SEED_AZURE)).providers.azure
    assert azure.enabled and (azure.subscription_id, azure.tenant_id, azure.client_id) == ("sub-1", "tenant-1",
                                                                                           "client-1")
    assert azure.client_secret.reveal() == "seed-azure-secret-value"


def test_all_three_seed_sections_beside_the_other_keys(tmp_path: Path, seed_env: None) -> None:
    text = ("state_dir: /tmp/x\nscaling:\n  max_instances: 10\nproviders:\n  local:\n    enabled: false\n"
            + SEED_AWS + SEED_GCP + SEED_AZURE + "  location: westeurope\n")
    path = write(tmp_path, text)
    path.chmod(0o600)
    config = load_config(path)
    p = config.providers
    assert p.aws.enabled and p.gcp.enabled and p.azure.enabled and not p.local.enabled
    assert p.azure.location == "westeurope", "any key providers.azure takes is taken in the seed section"
    assert config.scaling.max_instances == 10 and config.seed_sections == ("aws", "gcp", "azure")
    assert config.warnings == ()


def test_a_seed_section_may_switch_its_cloud_off(tmp_path: Path) -> None:
    assert not load_config(write(tmp_path, "gcp:\n  enabled: false\n")).providers.gcp.enabled


SEED_ERRORS = [
    ("aws:\n  region: ''\n", "aws.region", "required when the top-level aws section is given"),
    ("aws:\n  regoin: us-east-1\n", "aws.regoin", "unknown key (did you mean region?"),
    ("aws:\n  max_instances: -1\n", "aws.max_instances", "must be between 0 and"),
    ("aws:\n  access_key: AKIAEXAMPLE\n", "aws.secret_key", "required with aws.access_key"),
    ("aws:\n  subnet_id: vpc-1\n", "aws.subnet_id", "expected a subnet id"),
    ("aws: [us-east-1]\n", "aws", "expected a mapping"),
    ("gcp:\n  credentials_file: /k.json\n", "gcp.project_id", "required when the top-level gcp section is given"),
    ("gcp:\n  project_id: [p]\n", "gcp.project_id", "expected a string"),
    ("azure:\n  tenant_id: t\n", "azure.subscription_id", "required when the top-level azure section is given"),
    ("azure:\n  subscription_id: s\n  tenant_id: t\n", "azure.client_id", "give tenant_id, client_id, client_secret"),
    ("azure:\n  subscription_id: s\n  client_secret: ${CT_SEED_UNSET}\n", "azure.client_secret",
     "environment variable CT_SEED_UNSET is not set"),
    ("aws:\n  region: us-east-1\nproviders:\n  aws:\n    enabled: true\n", "aws",
     "the aws cloud is configured twice, as the top-level aws section and as providers.aws: keep one of them"),
    ("gcp:\n  project_id: p\nproviders:\n  gcp: {}\n", "gcp", "configured twice"),
    ("agents:\n  public_url: wss://127.0.0.1:9/v1/agent\naws: {}\n", "agents.public_url",
     "which the machines of aws cannot reach"),
    ("asw:\n  region: us-east-1\n", "asw", "did you mean aws?"),
]


@pytest.mark.parametrize(("text", "key", "expected"), SEED_ERRORS,
                         ids=[f"{i}-{row[1]}" for i, row in enumerate(SEED_ERRORS)])
def test_seed_form_errors_name_the_keys_as_written(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {key}: "), str(info.value)
    assert expected in str(info.value)


def test_seed_form_secrets_never_show(tmp_path: Path, seed_env: None) -> None:
    from structlog.testing import capture_logs

    from cloudtaskd.logs import log_config_warnings

    path = write(tmp_path, SEED_AWS.replace("${CT_SEED_AWS_SECRET}", "seed-literal-secret") + SEED_AZURE)
    path.chmod(0o644)
    config = load_config(path)
    hidden = ("seed-literal-secret", "AKIASEEDEXAMPLE", "seed-azure-secret-value")
    assert not any(v in repr(config) for v in hidden) and "<SECRET>" in repr(config)
    warning = readable_warning(config)
    assert warning is not None and warning.keys == ("aws.access_key", "aws.secret_key")
    with capture_logs() as logs:
        log_config_warnings(config)
    assert not any(v in repr(logs) for v in hidden)
    # Registered for redaction, like every secret: gone from any line this process writes.
    assert redact.redact("key seed-literal-secret and seed-azure-secret-value") == "key <SECRET> and <SECRET>"
    # A wrong value under a seed secret key is refused without being shown.
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "aws:\n  secret_key: 987654321987654321\n"))
    assert "987654321" not in str(info.value) and "aws.secret_key" in str(info.value)


# ---- `database`: SQLite in state_dir, or a PostgreSQL URL (issue 17) ----

PG_PASSWORD = "pg-secret-in-the-url-9f3a"


@pytest.mark.parametrize(("value", "expected"), [
    ("mysql://u:PW@h:5432/db", "expected postgresql://USER:${PGPASSWORD}@HOST:PORT/DBNAME, or sqlite"),
    ("postgresql://u:PW@:5432/db", "the URL names no host"),
    ("postgresql://u:PW@db.example:5432/", "the URL names no database"),
    ("postgresql://u:PW@db.example:5432", "the URL names no database"),
    ("postgresql://:PW@db.example:5432/db", "the URL names no user"),
    ("postgresql://u:PW@db.example:port/db", "the URL is malformed"),
    ("sqlite3", "expected postgresql://"),
])
def test_a_database_url_that_cannot_work_is_refused_naming_the_key_never_its_password(
        tmp_path: Path, value: str, expected: str) -> None:
    path = write(tmp_path, f"database: '{value.replace('PW', PG_PASSWORD)}'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: database: "), message
    assert expected in message, message
    assert PG_PASSWORD not in message


@pytest.mark.parametrize("text", ["", "database: sqlite\n", "database: ''\n"])
def test_the_database_is_sqlite_by_default(tmp_path: Path, text: str) -> None:
    config = load_config(write(tmp_path, text))
    assert not config.postgres


def test_a_postgresql_url_takes_its_password_from_the_environment_and_never_shows_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CT_TEST_PGPASSWORD", PG_PASSWORD)
    path = write(tmp_path, "database: postgresql://cloudtask:${CT_TEST_PGPASSWORD}@db.example:5432/cloudtask\n")
    path.chmod(0o644)  # readable by all: fine, the password is not in the file
    config = load_config(path)
    assert config.postgres
    assert config.database.reveal() == f"postgresql://cloudtask:{PG_PASSWORD}@db.example:5432/cloudtask"
    assert PG_PASSWORD not in repr(config) and PG_PASSWORD not in f"{config.database!r}"
    assert redact.redact(f"connect failed for {PG_PASSWORD}") == "connect failed for <SECRET>"
    assert redact.redact("the database sqlite at db.example") == "the database sqlite at db.example"  # only the pw
    assert readable_warning(config) is None


def test_a_password_written_in_the_database_url_is_a_secret_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"database: postgresql://cloudtask:{PG_PASSWORD}@db.example/cloudtask\n")
    path.chmod(0o644)
    warning = readable_warning(load_config(path))
    assert warning is not None and warning.keys == ("database",)
    assert PG_PASSWORD not in warning.message


def test_a_reload_cannot_move_the_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudtaskd.reload import plan

    monkeypatch.setenv("CT_TEST_PGPASSWORD", PG_PASSWORD)
    old = load_config(write(tmp_path, "database: sqlite\n"))
    new = load_config(write(tmp_path, "database: postgresql://u:${CT_TEST_PGPASSWORD}@db.example/ct\n"))
    result = plan(old, new, {})
    assert result.needs_restart == ("database",) and result.config.database == old.database
    assert "restart needed" in result.reasons["database"]


def test_a_reload_keeps_the_vms_ssh_key_until_a_restart(tmp_path: Path) -> None:
    from cloudtaskd.reload import plan

    old = load_config(write(tmp_path, "providers:\n  aws:\n    enabled: true\n    region: us-east-1\n"
                                      "    machine_type: t3.micro\n"))
    new = load_config(write(tmp_path, "providers:\n  aws:\n    enabled: true\n    region: us-east-1\n"
                                      "    machine_type: t3.micro\n    ssh_key_file: /etc/cloudtask/id_ed25519\n"))
    result = plan(old, new, {"aws": 4})
    assert result.needs_restart == ("providers.aws.ssh_key_file",)
    assert result.config.providers.aws.ssh_key_file == ""
    assert "same key" in result.reasons["providers.aws.ssh_key_file"]
