"""A replica deployed with the wrong TLS CA, or the wrong SSH key for a cloud's VMs, is refused at start
(issue 17, docs/replicas.md "The shared TLS CA" and "One SSH key for the clouds' VMs"), as real
processes on one real PostgreSQL database: replica A starts and records its CA; replica B with a CA
of its own exits non-zero and its log says why (both fingerprints, its ca.pem, what to do), having
served nothing; with A's CA copied in as the message says, B starts and serves a certificate that an
agent pinning A's CA accepts. The same for the aws provider (against moto) and the key each replica
makes in its state directory."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from cloudtaskd import tls
from cloudtaskd.core.tables import meta
from cloudtaskd.errors import short_sha256
from tests.fakes.moto_ec2 import MotoEc2
from tests.integration.test_agent_failover import log_events
from tests.procs import DaemonProcess, free_port, share_ca


def _config(dsn: str, port: int, **providers: dict[str, Any]) -> dict[str, Any]:
    return {"database": dsn, "log_level": "info", "agents": {"listen_port": port},
            "providers": {"local": {"max_instances": 0}, **providers}}


def _recorded(dsn: str, key: str = meta.TLS_CA_SHA256) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
    return None if row is None else str(row[0])


async def _handshake(port: int, ca_file: Path) -> None:
    """A TLS handshake with the agent listener, trusting ca_file alone (as an agent pins its CA)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    writer.close()
    await writer.wait_closed()


async def _refused(daemon: DaemonProcess, with_what: str) -> None:
    """The daemon's start fails: it exits non-zero without ever answering."""
    try:
        await daemon.start(timeout_s=60)
        raise AssertionError(f"replica B started with {with_what}")
    except RuntimeError:
        pass
    assert daemon.proc is not None
    assert daemon.proc.wait(timeout=30) != 0


async def test_a_replica_with_its_own_ca_is_refused_and_starts_once_given_the_shared_one(
        tmp_path: Path, pg_dsn: str) -> None:
    ports = free_port(), free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = DaemonProcess(tmp_path / "a", _config(pg_dsn, ports[0]))
    b = DaemonProcess(tmp_path / "b", _config(pg_dsn, ports[1]))
    try:
        await a.start()
        ca_a = a.state_dir / "tls" / "ca.pem"
        sha_a = tls.ca_fingerprint(ca_a)
        assert _recorded(pg_dsn) == sha_a
        assert [e["sha256"] for e in log_events(a.log_path, "tls_ca_recorded")] == [short_sha256(sha_a)]

        # B forgot the copy: it makes a CA of its own at start and must go no further.
        await _refused(b, "a CA of its own")
        ca_b = b.state_dir / "tls" / "ca.pem"
        sha_b = tls.ca_fingerprint(ca_b)
        assert sha_b != sha_a
        failed = log_events(b.log_path, "daemon_start_failed")
        assert len(failed) == 1, b.log_path.read_text()[-3000:]
        msg = failed[0]["error"]
        assert short_sha256(sha_a) in msg and short_sha256(sha_b) in msg, msg
        assert str(ca_b) in msg and "Copy ca.pem and ca.key" in msg and meta.FORGET_TLS_CA_SQL in msg, msg
        assert not log_events(b.log_path, "daemon_ready")
        assert _recorded(pg_dsn) == sha_a  # the refused replica changed nothing

        # What the message says to do: A's CA copied over B's; B issues its server certificate again.
        share_ca(a, b)
        await b.start(timeout_s=60)
        assert [e["sha256"] for e in log_events(b.log_path, "tls_ca_matches")] == [short_sha256(sha_a)]
        # An agent that pinned A's CA takes B's certificate: it can fail over to B.
        await _handshake(ports[1], ca_a)
        await _handshake(ports[0], ca_a)
    finally:
        await b.stop()
        await a.stop()

    # Restarted on their state directories, both still carry the recorded CA and start.
    await a.start()
    try:
        assert len(log_events(a.log_path, "tls_ca_matches")) == 1  # logged before it answers /v1/health
    finally:
        await a.stop()


def _lf(key: Path) -> str:
    """The key's fingerprint as `ssh-keygen -lf` prints it (what the message and the database show)."""
    return subprocess.run(["ssh-keygen", "-lf", str(key)], check=True, capture_output=True, text=True).stdout.split()[1]


async def test_a_replica_with_its_own_ssh_key_for_the_vms_is_refused_and_starts_once_given_the_shared_one(
        tmp_path: Path, pg_dsn: str, moto: MotoEc2, creds: None) -> None:
    moto.reset()
    # ssh_key_file left empty: each replica makes <state_dir>/ssh/id_ed25519 at its first start. No
    # work is submitted, so nothing is launched: the check is at start, before any launch.
    aws = {"enabled": True, "region": "us-east-1", "max_instances": 1, "machine_type": "t3.micro", "cpus": 2,
           "spot": False, "endpoint_url": moto.url}
    ports = free_port(), free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = DaemonProcess(tmp_path / "a", _config(pg_dsn, ports[0], aws=aws))
    b = DaemonProcess(tmp_path / "b", _config(pg_dsn, ports[1], aws=aws))
    aws_key = meta.ssh_key_sha256("aws")
    try:
        await a.start()
        key_a = a.state_dir / "ssh" / "id_ed25519"
        sha_a = _lf(key_a)
        assert _recorded(pg_dsn, aws_key) == sha_a
        recorded = log_events(a.log_path, "ssh_key_recorded")
        assert [(e["provider"], e["fingerprint"]) for e in recorded] == [("aws", sha_a)]

        # B was given the CA (so only its key differs) but not the key: it makes its own at start.
        share_ca(a, b)
        await _refused(b, "an SSH key of its own")
        key_b = b.state_dir / "ssh" / "id_ed25519"
        sha_b = _lf(key_b)  # made before the check, so that the check is on the key aws would use
        assert sha_b != sha_a
        failed = log_events(b.log_path, "daemon_start_failed")
        assert len(failed) == 1, b.log_path.read_text()[-3000:]
        msg = failed[0]["error"]
        assert msg.startswith("aws: ") and sha_a in msg and sha_b in msg and str(key_b) in msg, msg
        assert "Copy the key pair" in msg and meta.forget_sql(aws_key) in msg, msg
        assert not log_events(b.log_path, "daemon_ready")
        assert _recorded(pg_dsn, aws_key) == sha_a  # the refused replica changed nothing
        assert moto.calls["RunInstances"] == 0

        # What the message says to do: A's key pair copied over B's.
        for name in ("id_ed25519", "id_ed25519.pub"):
            shutil.copy2(a.state_dir / "ssh" / name, b.state_dir / "ssh" / name)
        await b.start(timeout_s=60)
        matches = log_events(b.log_path, "ssh_key_matches")
        assert [(e["provider"], e["fingerprint"]) for e in matches] == [("aws", sha_a)]
    finally:
        await b.stop()
        await a.stop()
