"""No secret of the config reaches a log, an error or cloudtaskctl's output, end to end.

A real cloudtaskd process with secrets in its config (the API token, AWS and Azure credentials
of disabled clouds written in the file, and an AWS key from the environment through ${VAR}) runs
a real job on the local provider; `cloudtaskctl` is used as a person uses it, over the unix socket
and the TCP listener; then `cloudtaskctl run` runs a job with a daemon embedded in itself. Every
byte the daemons, the agents and cloudtaskctl wrote — logs, outputs, the whole state directory,
the database included — is searched for every secret.

The checks can fail: the worker returns its whole environment as its result, and a variable that
is not a secret is seen in cloudtaskctl's output, so a secret a local agent inherited would be too;
the daemon is started through a wrapper that logs the token on purpose, as a Secret and as plain
text, and both must come out as <SECRET>.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests import paths

ROOT = paths.ROOT

API_TOKEN = "api-token-6b1f0c2d9e8a7b3c4d5e6f70"
AWS_SECRET = "aws-secret-key-3c9d2e1f0a7b6c5d4e3f"
AZURE_SECRET = "azure-client-secret-7e6d5c4b3a291807"
ENV_SECRET = "env-access-key-AKIA5F4E3D2C1B0A9"  # reaches the config as ${CT_E2E_ACCESS_KEY}
SECRETS = (API_TOKEN, AWS_SECRET, AZURE_SECRET, ENV_SECRET)
CANARY = "canary-value-not-a-secret-42"  # in the daemon's environment too, but not a secret

WORKER = {
    "cloudtask.yaml": "mode: python\nfunction: work:run\n",
    # Everything a task can see of its environment goes into its result, hence into `results`.
    "work.py": "import os\nasync def run(task_id, data):\n    return {'n': data['n'], 'env': dict(os.environ)}\n",
}

# cloudtaskd's main, with one line more once logging is set up: the API token, logged on purpose.
LEAKY_DAEMON = """
import sys
import structlog
from cloudtaskd import daemon, logs
original = logs.log_config_warnings
def leak(config):
    original(config)
    token = config.api.token
    structlog.get_logger("test").warning("deliberate_leak", as_secret=token, as_text="token=" + token.reveal())
logs.log_config_warnings = leak
daemon.main(sys.argv[1:])
"""


def ctl(env: dict[str, str], cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cloudtaskd.ctl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, stdin=subprocess.DEVNULL)


async def wait_ready(socket: Path, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as http:
        while True:
            try:
                async with http.get("http://cloudtaskd/v1/health") as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"cloudtaskd did not start:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.05)


def everything_written(tmp_path: Path, config: Path) -> dict[str, bytes]:
    """Every file under the test's directory but the config itself (which holds secrets on purpose)."""
    return {str(p.relative_to(tmp_path)): p.read_bytes() for p in sorted(tmp_path.rglob("*"))
            if p.is_file() and not p.is_socket() and p != config}


async def test_no_secret_reaches_logs_errors_or_cloudtaskctl(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(state),
        "log_level": "debug",
        "api": {"listen": "127.0.0.1:0", "token": API_TOKEN},
        "agents": {"lease_ttl_s": 10},
        "scaling": {"tick_s": 0.2, "idle_timeout_s": 1},
        "queue": {"retry_backoff_s": 0.05},
        "providers": {
            "local": {"max_instances": 1, "cpus": 2},
            "aws": {"enabled": False, "access_key": "${CT_E2E_ACCESS_KEY}", "secret_key": AWS_SECRET},
            "azure": {"enabled": False, "tenant_id": "t", "client_id": "c", "client_secret": AZURE_SECRET},
        },
    }))
    config.chmod(0o644)  # readable by everyone: the daemon must say so, without the values
    worker = tmp_path / "worker"
    worker.mkdir()
    for name, text in WORKER.items():
        (worker / name).write_text(text)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "data": {"n": i}}) + "\n" for i in range(5)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CT_E2E_ACCESS_KEY": ENV_SECRET, "CT_E2E_CANARY": CANARY}
    env.pop("CLOUDTASK_API_TOKEN", None)
    outputs: dict[str, str] = {}

    def run_ctl(*args: str, ok: bool = True, extra_env: dict[str, str] | None = None) -> str:
        proc = ctl({**env, **(extra_env or {})}, tmp_path, *args, "--config", str(config))
        outputs[" ".join(args)] = proc.stdout + proc.stderr
        assert (proc.returncode == 0) == ok, f"cloudtaskctl {' '.join(args)}: {proc.returncode}\n{proc.stderr}"
        return proc.stdout

    daemon_log = tmp_path / "daemon.log"
    with daemon_log.open("ab") as out:
        daemon = subprocess.Popen([sys.executable, "-c", LEAKY_DAEMON, "--config", str(config)],
                                  stdout=out, stderr=out, cwd=ROOT, env=env)
    try:
        await wait_ready(state / "cloudtaskd.sock", daemon, daemon_log)
        job = json.loads(run_ctl("submit", "--tasks", str(tasks), "--worker", str(worker), "--json"))["id"]
        run_ctl("watch", str(job))
        results = run_ctl("results", str(job))
        run_ctl("status")
        run_ctl("status", str(job), "--json")
        run_ctl("tasks", str(job))
        instances = json.loads(run_ctl("instances", "--all", "--json"))
        [instance] = [i["id"] for i in instances["instances"]]
        run_ctl("instances", "--logs", instance)
        run_ctl("cost", str(job))
        run_ctl("catalog")
        run_ctl("prices")
        run_ctl("interruptions")
        # Over the TCP listener, with the token from the environment; and with a wrong one.
        ready = next(json.loads(line) for line in daemon_log.read_text().splitlines() if '"daemon_ready"' in line)
        if ready.get("api_url"):
            tcp = ("--url", ready["api_url"], "--ca-file", str(state / "tls" / "ca.pem"))
            run_ctl("status", *tcp, extra_env={"CLOUDTASK_API_TOKEN": API_TOKEN})
            run_ctl("status", *tcp, ok=False, extra_env={"CLOUDTASK_API_TOKEN": "wrong-token-0000000000000"})
        run_ctl("results", "999", ok=False)  # an error from the daemon
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()

    # The same config with the daemon embedded in cloudtaskctl run (its log: <state>/cloudtaskd.log).
    run_ctl("run", "--tasks", str(tasks), "--worker", str(worker), "--results", str(tmp_path / "run.jsonl"))

    # What was searched is what it should be: the jobs ran, the agents and daemons logged, and what
    # the tasks saw of their environment came out (the canary), so an inherited secret would have too.
    rows = [json.loads(line) for line in results.splitlines()]
    assert len(rows) == 5 and all(r["status"] == "succeeded" for r in rows)
    assert rows[0]["result"]["env"]["CT_E2E_CANARY"] == CANARY
    written = everything_written(tmp_path, config)
    assert any(name.endswith("agent.log") and b"agent_started" in data for name, data in written.items())
    assert b"daemon_ready" in written["daemon.log"] and b"daemon_ready" in written["state/cloudtaskd.log"]
    assert CANARY.encode() in written["run.jsonl"]

    # The daemon said the file is readable and named the keys written in it, not the values.
    lines = [json.loads(line) for line in daemon_log.read_text().splitlines() if line.startswith("{")]
    [warning] = [e for e in lines if e["event"] == "config_secrets_readable"]
    assert warning["keys"] == ["api.token", "providers.aws.secret_key", "providers.azure.client_secret"]
    assert warning["mode"] == "0644" and warning["file"] == str(config)
    # The token logged on purpose came out redacted, both as a Secret and as plain text.
    [leak] = [e for e in lines if e["event"] == "deliberate_leak"]
    assert leak["as_secret"] == "<SECRET>" and leak["as_text"] == "token=<SECRET>"

    for secret in SECRETS:
        for form in {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1]}:
            leaked = [name for name, data in written.items() if form.encode() in data]
            leaked += [f"cloudtaskctl {cmd}" for cmd, text in outputs.items() if form in text]
            assert not leaked, f"a secret ({secret[:8]}…) appears in: {leaked}"
    assert not re.search(rb"api-token-|aws-secret-key-|azure-client-secret-|env-access-key-",
                         b"".join(written.values()) + "".join(outputs.values()).encode())
    assert "CT_E2E_ACCESS_KEY" not in rows[0]["result"]["env"], "a local agent inherited the daemon's ${VAR}"


@pytest.mark.parametrize("value", ["${CT_E2E_UNSET_SECRET}", "[not, a, string, s3cr3t-e2e-value]"])
def test_a_config_error_on_a_secret_shows_no_value(tmp_path: Path, value: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\napi:\n  token: {value}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("CT_E2E_UNSET_SECRET", None)
    daemon = subprocess.run([sys.executable, "-m", "cloudtaskd.daemon", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    status = ctl(env, tmp_path, "status", "--config", str(config))
    for proc in (daemon, status):
        assert proc.returncode == 2 and f"{config}: api.token: " in proc.stderr, proc.stderr
        assert "s3cr3t" not in proc.stdout + proc.stderr
