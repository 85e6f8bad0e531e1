"""What every replica on a database must share (cloudtaskd/core/pg/shared_identity.py, issue 17), on a
real PostgreSQL. The TLS CA: the first replica records its fingerprint, a replica with the same CA
starts, one with another CA is refused with a message naming both and what to do, and of two first
replicas starting at once exactly one wins (the database decides) and the other gets that same
message. The SSH key each cloud provider logs in to its VMs with: the same, per provider, for the
providers the replica starts only."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudtaskd import tls
from cloudtaskd.config import AgentsConfig, ApiConfig, Config
from cloudtaskd.core.pg import shared_identity
from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.store import Tx
from cloudtaskd.core.tables import meta
from cloudtaskd.errors import SharedCaMismatch, short_sha256

HOLD_S = 0.05  # the winner keeps its transaction open a moment: the loser's insert waits on its row
RACES = 5


def _ca(tls_dir: Path) -> tuple[Path, str]:
    """A CA of its own in tls_dir (as a replica makes at its first start), and its fingerprint."""
    files = tls.ensure(tls_dir, [])
    der = x509.load_pem_x509_certificate(files.ca_cert.read_bytes()).public_bytes(serialization.Encoding.DER)
    return files.ca_cert, hashlib.sha256(der).hexdigest()


def _check_ca(tx: Tx, sha256: str, ca_path: Path) -> bool:
    return shared_identity.check(tx, [shared_identity.tls_ca(sha256, ca_path)])[0]


async def _recorded(store: PgStore, key: str = meta.TLS_CA_SHA256) -> str | None:
    row = await store.fetchone("SELECT value FROM meta WHERE key = ?", (key,))
    return None if row is None else str(row["value"])


async def test_the_first_replica_records_its_ca_and_the_same_ca_is_accepted(pg_store: PgStore, tmp_path: Path) -> None:
    ca_a, sha_a = _ca(tmp_path / "a" / "tls")
    assert tls.ca_fingerprint(ca_a) == sha_a  # SHA-256 of the certificate's DER, not of the key or the PEM
    assert await _recorded(pg_store) is None

    assert await pg_store.write(_check_ca, sha_a, ca_a) is True
    assert await _recorded(pg_store) == sha_a

    # A second replica with the CA copied from the first (share_ca, as docs/replicas.md says).
    (tmp_path / "b" / "tls").mkdir(parents=True)
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(tmp_path / "a" / "tls" / name, tmp_path / "b" / "tls" / name)
    ca_b = tls.ensure(tmp_path / "b" / "tls", ["b.example"]).ca_cert
    assert await pg_store.write(_check_ca, tls.ca_fingerprint(ca_b), ca_b) is False
    assert await _recorded(pg_store) == sha_a


async def test_a_replica_with_another_ca_is_refused_with_what_to_do(pg_store: PgStore, tmp_path: Path) -> None:
    ca_a, sha_a = _ca(tmp_path / "a" / "tls")
    ca_b, sha_b = _ca(tmp_path / "b" / "tls")
    assert sha_a != sha_b
    await pg_store.write(_check_ca, sha_a, ca_a)

    with pytest.raises(SharedCaMismatch) as caught:
        await pg_store.write(_check_ca, sha_b, ca_b)
    err = caught.value
    assert (err.own_sha256, err.recorded_sha256, err.ca_path) == (sha_b, sha_a, str(ca_b))
    msg = str(err)
    assert short_sha256(sha_b) in msg and short_sha256(sha_a) in msg
    assert str(ca_b) in msg
    assert "Copy ca.pem and ca.key from <state_dir>/tls of a replica that is running" in msg
    assert meta.FORGET_TLS_CA_SQL in msg
    assert await _recorded(pg_store) == sha_a  # the refused replica changed nothing

    # The reset the message gives: the record forgotten, the next replica to start records its own.
    await pg_store.write(lambda tx: tx.db.execute(meta.FORGET_TLS_CA_SQL))
    assert await pg_store.write(_check_ca, sha_b, ca_b) is True
    assert await _recorded(pg_store) == sha_b


async def test_two_first_replicas_at_once_the_database_picks_one(pg_dsn: str, tmp_path: Path) -> None:
    cas = [_ca(tmp_path / name / "tls") for name in ("a", "b")]
    stores = [PgStore(pg_dsn), PgStore(pg_dsn)]
    for s in stores:
        await s.open()
    try:
        for race in range(RACES):
            barrier = threading.Barrier(2, timeout=10)

            def first_start(tx: Tx, sha: str, path: Path, barrier: threading.Barrier = barrier) -> bool:
                barrier.wait()  # on both writer threads: the two checks run at the same moment
                first = _check_ca(tx, sha, path)
                time.sleep(HOLD_S)  # before the commit: the other's insert meets an uncommitted row
                return first

            outcomes = await asyncio.gather(
                *(s.write(first_start, sha, path) for s, (path, sha) in zip(stores, cas, strict=True)),
                return_exceptions=True)
            winners = [i for i, out in enumerate(outcomes) if out is True]
            assert len(winners) == 1, f"race {race}: {outcomes!r}"
            winner, loser = winners[0], 1 - winners[0]
            refused = outcomes[loser]
            assert isinstance(refused, SharedCaMismatch), f"race {race}: {refused!r}"
            assert (refused.own_sha256, refused.recorded_sha256) == (cas[loser][1], cas[winner][1])
            assert await _recorded(stores[0]) == cas[winner][1]
            await stores[0].write(lambda tx: tx.db.execute(meta.FORGET_TLS_CA_SQL))
    finally:
        for s in stores:
            await s.close()


def test_what_pins_the_daemons_own_ca() -> None:
    base = Config()
    assert shared_identity.ca_pinned(base)  # agents.tls is on by default: agents pin the daemon's CA
    no_agents_tls = replace(base, agents=replace(base.agents, tls=False))
    assert not shared_identity.ca_pinned(no_agents_tls)
    api = ApiConfig(listen="127.0.0.1:8443")
    # The TCP API served the daemon's own certificate: its clients pin ca.pem.
    assert shared_identity.ca_pinned(replace(no_agents_tls, api=api))
    # A certificate of the user's own: nothing pins the daemon's CA.
    assert not shared_identity.ca_pinned(replace(no_agents_tls, api=replace(api, tls_cert="c.pem", tls_key="k.pem")))
    # Agents always pin the daemon's CA, whatever certificate the API is given.
    assert shared_identity.ca_pinned(replace(base, api=replace(api, tls_cert="c.pem", tls_key="k.pem"),
                                    agents=AgentsConfig(tls=True)))
