"""Log lines as journald keeps them: one JSON object per line, and the instance and provider in the
context of everything a launch or a termination logs (the provider's own lines included)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import structlog

from cloudtaskd import logs
from cloudtaskd.daemon import Daemon
from tests.conftest import UnixApi, make_config, wait_for
from tests.integration.test_daemon_e2e import PY_WORKER, finished, jsonl, submit


async def test_provider_lines_carry_the_instance_and_provider_they_are_about(tmp_path: Path) -> None:
    buf = io.StringIO()
    logs.configure("info", buf)
    try:
        d = Daemon(make_config(tmp_path), shutdown_grace_s=5)
        await d.start()
        api = UnixApi(d.config.socket_path)
        try:
            job_id = await submit(api, PY_WORKER, jsonl([{"id": f"t{i}", "data": {"n": i}} for i in range(3)]))
            await wait_for(lambda: finished(api, job_id), message="job done")
        finally:
            await api.close()
            await d.stop()
    finally:
        structlog.reset_defaults()
    records = [json.loads(line) for line in buf.getvalue().splitlines()]  # every line is one JSON object
    started = [r for r in records if r["event"] == "local_agent_started"]
    assert started, "the local provider logged no start"
    # The local provider's own call names neither the provider nor the pool: the context does.
    assert all(r["provider"] == "local" and r["instance"].startswith("local-") and "pool" in r for r in started)
    # The context ends with the launch: lines after it are not mislabelled.
    assert not any(r.get("provider") == "local" for r in records if r["event"] == "daemon_stopped")
