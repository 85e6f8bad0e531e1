"""Secrets stay out of log lines, errors, instance errors and local agents' environments."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from cloudtaskd import logs, redact
from cloudtaskd.config import Secret, load_config
from cloudtaskd.core.states import InstanceEvent, InstanceState
from cloudtaskd.core.store import Store
from cloudtaskd.errors import ConfigError, ProviderError

# Secrets as a config holds them: one in the file, one from the environment, one with characters
# JSON escapes (a quote, a backslash, a non-ASCII letter).
FILE_SECRET = "file-secret-9f8e7d6c5b4a"
ENV_SECRET = "env-secret-1a2b3c4d5e6f"
ODD_SECRET = 'odd"sec\\ret-é-0123'


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    redact.forget_all()
    yield
    redact.forget_all()
    if logs._stdlib_handler is not None:
        logging.getLogger().removeHandler(logs._stdlib_handler)
        logs._stdlib_handler = None
    structlog.reset_defaults()


@pytest.fixture
def registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The three secrets registered the way the daemon registers them: by loading its config."""
    monkeypatch.setenv("CT_TEST_ENV_SECRET", ENV_SECRET)
    path = tmp_path / "config.yaml"
    path.write_text(f"api:\n  token: {json.dumps(FILE_SECRET)}\n"
                    "providers:\n  aws:\n    secret_key: ${CT_TEST_ENV_SECRET}\n"
                    f"  azure:\n    client_secret: {json.dumps(ODD_SECRET)}\n"
                    "  gcp:\n    credentials_file: ''\n")
    load_config(path)


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_a_secret_value_is_logged_as_secret_even_unregistered() -> None:
    buf = io.StringIO()
    logs.configure("debug", buf)
    log = structlog.get_logger()
    short = Secret("abc")  # too short to search text for, and not registered: the type alone hides it
    log.info("credentials", token=short, nested={"a": [short, {"b": short}]}, pair=(short, 1))
    [line] = lines(buf)
    record = json.loads(line)
    assert record["token"] == "<SECRET>"
    assert record["nested"] == {"a": ["<SECRET>", {"b": "<SECRET>"}]} and record["pair"] == ["<SECRET>", 1]


def test_registered_secrets_are_removed_from_every_line(registered: None) -> None:
    buf = io.StringIO()
    logs.configure("debug", buf)
    log = structlog.get_logger()
    log.info("formatted", message=f"token is {FILE_SECRET}", url=f"https://u:{ENV_SECRET}@host/")
    log.info("odd", detail=str(ODD_SECRET), event_in=[f"x{ODD_SECRET}x"])
    try:
        raise RuntimeError(f"auth failed with {ENV_SECRET}")
    except RuntimeError:
        log.exception("with_traceback")
    # The standard library's records (aiohttp, asyncssh) take the same way out.
    logging.getLogger("aiohttp.client").error("sent Authorization: Bearer %s", FILE_SECRET)
    logging.getLogger("asyncssh").warning("odd %r", ODD_SECRET)
    text = buf.getvalue()
    assert len(lines(buf)) == 5
    for secret in (FILE_SECRET, ENV_SECRET, ODD_SECRET, json.dumps(ODD_SECRET)[1:-1]):
        assert secret not in text
    assert "sec\\\\ret" not in text  # the JSON-escaped backslash form
    assert text.count("<SECRET>") >= 7
    assert "token is <SECRET>" in text and "Bearer <SECRET>" in text


def test_without_registration_the_same_lines_would_leak() -> None:
    """The control for the test above: the plain text does reach the line when nothing is registered."""
    buf = io.StringIO()
    logs.configure("debug", buf)
    structlog.get_logger().info("formatted", message=f"token is {FILE_SECRET}")
    assert FILE_SECRET in buf.getvalue()


def test_errors_are_redacted(registered: None) -> None:
    exc = ProviderError("aws", "launch", f"SignatureDoesNotMatch: Credential={ENV_SECRET}/20260101")
    assert ENV_SECRET not in str(exc) and "Credential=<SECRET>/" in str(exc)
    assert FILE_SECRET not in str(ConfigError("c.yaml", "api.token", f"bad {FILE_SECRET}"))


def test_short_values_are_not_searched_for() -> None:
    redact.register("abc")
    assert not redact.registered()
    assert redact.redact("abcdef") == "abcdef"


def test_a_secret_containing_another_is_replaced_whole() -> None:
    redact.register("secret-part")
    redact.register("whole-secret-part-and-more")
    assert redact.redact("x whole-secret-part-and-more y secret-part") == "x <SECRET> y <SECRET>"


def test_local_agents_do_not_inherit_the_daemons_secrets(registered: None) -> None:
    env = {"PATH": "/usr/bin", "CT_TEST_ENV_SECRET": ENV_SECRET, "WRAPPED": f"x{FILE_SECRET}x", "HOME": "/h"}
    assert redact.without_secrets(env) == {"PATH": "/usr/bin", "HOME": "/h"}


async def test_an_instance_error_is_stored_redacted(tmp_path: Path, registered: None) -> None:
    store = Store(tmp_path / "t.db")
    await store.open()
    try:
        await store.write(lambda tx: tx.db.execute(
            "INSERT INTO instances (id, provider, state, slots, token_hash, created_at, state_changed_at)"
            " VALUES ('i-1', 'aws', ?, 1, '', 0, 0)", (InstanceState.PENDING.value,)))
        await store.write(lambda tx: tx.transition_instance(
            "i-1", InstanceEvent.LAUNCH_FAILED, error=f"AuthFailure: key {ENV_SECRET} is not valid"))
        row = await store.read(lambda db: db.execute("SELECT last_error FROM instances WHERE id = 'i-1'").fetchone())
    finally:
        await store.close()
    assert row[0] == "AuthFailure: key <SECRET> is not valid"


def test_nothing_registered_costs_nothing() -> None:
    text = "a log line"
    assert redact.redact(text) is text
    assert os.environ.copy() == redact.without_secrets(os.environ)
