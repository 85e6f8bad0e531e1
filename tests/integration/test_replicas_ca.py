"""A replica deployed with the wrong TLS CA is refused at start (issue 17, docs/replicas.md "The shared
TLS CA"), as real processes on one real PostgreSQL database: replica A starts and records its CA;
replica B with a CA of its own exits non-zero and its log says why (both fingerprints, its ca.pem,
what to do), having served nothing; with A's CA copied in as the message says, B starts and serves a
certificate that an agent pinning A's CA accepts."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import psycopg

from cloudtaskd import tls
from cloudtaskd.core.tables import meta
from cloudtaskd.errors import short_sha256
from tests.integration.test_agent_failover import log_events
from tests.procs import DaemonProcess, free_port, share_ca


def _config(dsn: str, port: int) -> dict[str, Any]:
    return {"database": dsn, "log_level": "info", "agents": {"listen_port": port},
            "providers": {"local": {"max_instances": 0}}}


def _recorded(dsn: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = %s", (meta.TLS_CA_SHA256,)).fetchone()
    return None if row is None else str(row[0])


async def _handshake(port: int, ca_file: Path) -> None:
    """A TLS handshake with the agent listener, trusting ca_file alone (as an agent pins its CA)."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    writer.close()
    await writer.wait_closed()


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
        try:
            await b.start(timeout_s=60)
            raise AssertionError("replica B started with a CA of its own")
        except RuntimeError:
            pass
        assert b.proc is not None
        assert b.proc.wait(timeout=30) != 0
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
