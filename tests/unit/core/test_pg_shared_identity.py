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
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from cloudtaskd import tls
from cloudtaskd.config import AgentsConfig, ApiConfig, Config
from cloudtaskd.core.pg import shared_identity
from cloudtaskd.core.pg.store import PgStore
from cloudtaskd.core.store import Tx
from cloudtaskd.core.tables import meta
from cloudtaskd.daemon import claim_start, shared_identities
from cloudtaskd.errors import SharedCaMismatch, SharedSshKeyMismatch, short_sha256
from cloudtaskd.fleet.providers.descriptors import ProviderEnv
from cloudtaskd.fleet.providers.sections.ssh import SshHostConfig
from cloudtaskd.fleet.runtime import RuntimeBuilder
from cloudtaskd.fleet.tunnels import Tunnels

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


@pytest.fixture
async def two_stores(pg_dsn: str) -> AsyncIterator[list[PgStore]]:
    """Two replicas' stores on one database."""
    stores = [PgStore(pg_dsn), PgStore(pg_dsn)]
    for s in stores:
        await s.open()
    try:
        yield stores
    finally:
        for s in stores:
            await s.close()


async def at_once(stores: list[PgStore], step: Callable[..., Any], args: list[tuple[Any, ...]]) -> list[Any]:
    """Each store's writer runs step(tx, *its args), all at the same moment, and holds its transaction
    HOLD_S before the commit (so the other's insert meets an uncommitted row). Exceptions come back
    as values."""
    barrier = threading.Barrier(len(stores), timeout=10)

    def held(tx: Tx, *a: Any) -> Any:
        barrier.wait()
        out = step(tx, *a)
        time.sleep(HOLD_S)
        return out

    return await asyncio.gather(*(s.write(held, *a) for s, a in zip(stores, args, strict=True)),
                                return_exceptions=True)


async def test_two_first_replicas_at_once_the_database_picks_one(two_stores: list[PgStore], tmp_path: Path) -> None:
    cas = [_ca(tmp_path / name / "tls") for name in ("a", "b")]
    stores = two_stores
    for race in range(RACES):
        outcomes = await at_once(stores, _check_ca, [(sha, path) for path, sha in cas])
        winners = [i for i, out in enumerate(outcomes) if out is True]
        assert len(winners) == 1, f"race {race}: {outcomes!r}"
        winner, loser = winners[0], 1 - winners[0]
        refused = outcomes[loser]
        assert isinstance(refused, SharedCaMismatch), f"race {race}: {refused!r}"
        assert (refused.own_sha256, refused.recorded_sha256) == (cas[loser][1], cas[winner][1])
        assert await _recorded(stores[0]) == cas[winner][1]
        await stores[0].write(lambda tx: tx.db.execute(meta.FORGET_TLS_CA_SQL))


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


# ---- the SSH key each cloud provider logs in to its VMs with ----


def _replica(tmp_path: Path, name: str, store: PgStore, **providers: dict[str, object]) -> tuple[Config, ProviderEnv]:
    """A replica's config (its own state_dir, agents.tls off so that only SSH keys are checked) with
    the providers given (their section's fields), and what the daemon hands the providers it starts."""
    base = Config(state_dir=str(tmp_path / name))
    sections = {p: replace(getattr(base.providers, p), **fields) for p, fields in providers.items()}
    config = replace(base, agents=replace(base.agents, tls=False), providers=replace(base.providers, **sections))
    env = ProviderEnv(daemon_id=name, state_dir=config.state_path, store=store,  # type: ignore[arg-type]
                      runtime=RuntimeBuilder(config.state_path / "runtime", ()), tunnels=Tunnels("127.0.0.1", 0, "wss"),
                      source=f"{name}.yaml")
    return config, env


async def _start_check(store: PgStore, config: Config, env: ProviderEnv) -> dict[str, bool]:
    """What the daemon runs at start on PostgreSQL: the replica's identities checked in one transaction."""
    identities = shared_identities(config, None, env)
    firsts = await store.write(shared_identity.check, identities)
    return {i.meta_key: first for i, first in zip(identities, firsts, strict=True)}


def _lf(key: Path) -> str:
    """The key's fingerprint as `ssh-keygen -lf` prints it (what an operator compares)."""
    return subprocess.run(["ssh-keygen", "-lf", str(key)], check=True, capture_output=True, text=True).stdout.split()[1]


def _keygen(path: Path) -> str:
    """A key pair made by OpenSSH's ssh-keygen, and its fingerprint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return _lf(path)


async def _meta_keys(store: PgStore) -> dict[str, str]:
    rows = await store.fetchall("SELECT key, value FROM meta WHERE key LIKE ?", (f"{meta.SSH_KEY_SHA256_PREFIX}%",))
    return {str(r["key"]): str(r["value"]) for r in rows}


AWS = {"enabled": True, "region": "us-east-1", "machine_type": "t3.micro"}
GCP = {"enabled": True, "project_id": "p", "zone": "europe-west1-b", "machine_type": "e2-small"}
AWS_KEY = meta.ssh_key_sha256("aws")
GCP_KEY = meta.ssh_key_sha256("gcp")


async def test_the_first_replica_records_its_vms_ssh_key_and_the_copied_key_is_accepted(
        pg_store: PgStore, tmp_path: Path) -> None:
    a, env_a = _replica(tmp_path, "a", pg_store, aws=AWS)
    # ssh_key_file empty: the daemon's own key, made at start before the check (as a first start does).
    assert await _start_check(pg_store, a, env_a) == {AWS_KEY: True}
    key_a = a.state_path / "ssh" / "id_ed25519"
    assert key_a.exists() and Path(f"{key_a}.pub").exists()
    sha_a = _lf(key_a)
    assert sha_a.startswith("SHA256:")
    assert await _meta_keys(pg_store) == {AWS_KEY: sha_a}  # as ssh-keygen -lf prints it: operators compare

    # Replica B with A's key pair copied into its state directory before its first start: accepted.
    b, env_b = _replica(tmp_path, "b", pg_store, aws=AWS)
    (b.state_path / "ssh").mkdir(parents=True)
    for name in ("id_ed25519", "id_ed25519.pub"):
        shutil.copy2(a.state_path / "ssh" / name, b.state_path / "ssh" / name)
    assert await _start_check(pg_store, b, env_b) == {AWS_KEY: False}
    # And the same key through ssh_key_file: one key file for every replica.
    c, env_c = _replica(tmp_path, "c", pg_store, aws={**AWS, "ssh_key_file": str(key_a)})
    assert await _start_check(pg_store, c, env_c) == {AWS_KEY: False}
    assert await _meta_keys(pg_store) == {AWS_KEY: sha_a}


async def test_a_replica_with_another_ssh_key_is_refused_with_what_to_do(pg_store: PgStore, tmp_path: Path) -> None:
    a, env_a = _replica(tmp_path, "a", pg_store, aws=AWS)
    await _start_check(pg_store, a, env_a)
    sha_a = (await _meta_keys(pg_store))[AWS_KEY]
    # B forgot the copy: it makes a key of its own. With agents.tls on, its CA (never recorded yet) is
    # checked in the same transaction: refused for the key, it records nothing at all.
    b, env_b = _replica(tmp_path, "b", pg_store, aws=AWS)
    files_b = tls.ensure(tmp_path / "b" / "tls", [])
    b = replace(b, agents=replace(b.agents, tls=True))
    key_b = b.state_path / "ssh" / "id_ed25519"
    with pytest.raises(SharedSshKeyMismatch) as caught:
        await pg_store.write(shared_identity.check, shared_identities(b, files_b, env_b))
    err = caught.value
    sha_b = _lf(key_b)
    assert sha_b != sha_a
    assert (err.provider, err.own, err.recorded, err.path) == ("aws", sha_b, sha_a, str(key_b))
    msg = str(err)
    assert msg.startswith("aws: ") and sha_a in msg and sha_b in msg and str(key_b) in msg, msg
    assert "Copy the key pair" in msg and "providers.aws.ssh_key_file" in msg, msg
    reset = "DELETE FROM meta WHERE key = 'ssh_key_sha256:aws';"
    assert err.reset_sql == reset and reset in msg, msg
    assert await _meta_keys(pg_store) == {AWS_KEY: sha_a}  # the refused replica changed nothing
    assert await _recorded(pg_store) is None  # not even the CA it claimed before its key was refused

    # The reset the message gives: the record forgotten, the next replica to start records its own.
    await pg_store.write(lambda tx: tx.db.execute(err.reset_sql))
    assert await pg_store.write(shared_identity.check, shared_identities(b, files_b, env_b)) == [True, True]
    assert await _meta_keys(pg_store) == {AWS_KEY: sha_b}
    assert await _recorded(pg_store) == tls.ca_fingerprint(files_b.ca_cert)


async def test_two_providers_with_their_own_keys_are_each_recorded_and_checked_on_their_own(
        pg_store: PgStore, tmp_path: Path) -> None:
    key_aws, key_gcp = tmp_path / "keys" / "aws", tmp_path / "keys" / "gcp"
    sha_aws, sha_gcp = _keygen(key_aws), _keygen(key_gcp)
    a, env_a = _replica(tmp_path, "a", pg_store, aws={**AWS, "ssh_key_file": str(key_aws)},
                        gcp={**GCP, "ssh_key_file": str(key_gcp)})
    assert await _start_check(pg_store, a, env_a) == {AWS_KEY: True, GCP_KEY: True}
    assert await _meta_keys(pg_store) == {AWS_KEY: sha_aws, GCP_KEY: sha_gcp}
    # B gives gcp the aws key: aws is accepted, gcp refused, naming gcp and its own setting.
    b, env_b = _replica(tmp_path, "b", pg_store, aws={**AWS, "ssh_key_file": str(key_aws)},
                        gcp={**GCP, "ssh_key_file": str(key_aws)})
    with pytest.raises(SharedSshKeyMismatch) as caught:
        await _start_check(pg_store, b, env_b)
    assert (caught.value.provider, caught.value.own, caught.value.recorded) == ("gcp", sha_aws, sha_gcp)
    assert "providers.gcp.ssh_key_file" in str(caught.value)
    assert await _meta_keys(pg_store) == {AWS_KEY: sha_aws, GCP_KEY: sha_gcp}


async def test_providers_that_do_not_start_or_whose_hosts_are_the_users_are_not_checked(
        pg_store: PgStore, tmp_path: Path) -> None:
    key_a = tmp_path / "keys" / "a"
    sha_a = _keygen(key_a)
    a, env_a = _replica(tmp_path, "a", pg_store, aws={**AWS, "ssh_key_file": str(key_a)})
    await _start_check(pg_store, a, env_a)
    # B: aws with the same key; gcp disabled and azure enabled with max_instances 0 (neither starts:
    # their key files do not even exist); the ssh provider's hosts are the user's, each with its own
    # key_file, which the hosts' own authorized_keys accept or not (docs/replicas.md).
    missing = str(tmp_path / "nowhere" / "id_ed25519")
    host = replace(SshHostConfig(), address="192.0.2.1", key_file=str(tmp_path / "keys" / "own"))
    _keygen(tmp_path / "keys" / "own")
    b, env_b = _replica(tmp_path, "b", pg_store, aws={**AWS, "ssh_key_file": str(key_a)},
                        gcp={**GCP, "enabled": False, "ssh_key_file": missing},
                        azure={"enabled": True, "max_instances": 0, "ssh_key_file": missing},
                        ssh={"hosts": (host,)})
    assert await _start_check(pg_store, b, env_b) == {AWS_KEY: False}
    assert await _meta_keys(pg_store) == {AWS_KEY: sha_a}
    assert not (b.state_path / "ssh").exists()  # no key of the daemon's own made for a provider not started


async def test_two_first_replicas_at_once_claim_one_daemon_id(two_stores: list[PgStore]) -> None:
    """The daemon id (shared by every replica of a database) is claimed, not read then inserted: two
    first starts at the same moment both get the one the database kept, where the second's insert
    used to fail on the key's unique index and stop that replica."""
    stores = two_stores
    for race in range(RACES):
        ids = await at_once(stores, claim_start, [(f"id-{race}-{i}", []) for i in range(len(stores))])
        assert ids[0] == ids[1], f"race {race}: {ids!r}"
        assert ids[0][0] in (f"id-{race}-0", f"id-{race}-1")
        row = await stores[0].fetchone("SELECT value FROM meta WHERE key = ?", (meta.DAEMON_ID,))
        assert row is not None and row["value"] == ids[0][0]
        await stores[0].write(lambda tx: tx.db.execute("DELETE FROM meta WHERE key = 'daemon_id'"))


async def test_a_refused_replica_claims_no_daemon_id(pg_store: PgStore, tmp_path: Path) -> None:
    """The id and the shared identities are claimed in one transaction: a replica refused by the check
    records neither (here the fingerprint was recorded before any id, e.g. by a reset by hand)."""
    ca_a, sha_a = _ca(tmp_path / "a" / "tls")
    ca_b, sha_b = _ca(tmp_path / "b" / "tls")
    await pg_store.write(_check_ca, sha_a, ca_a)
    with pytest.raises(SharedCaMismatch):
        await pg_store.write(claim_start, "refused", [shared_identity.tls_ca(sha_b, ca_b)])
    assert await _recorded(pg_store, meta.DAEMON_ID) is None
    daemon_id, firsts = await pg_store.write(claim_start, "kept", [shared_identity.tls_ca(sha_a, ca_a)])
    assert (daemon_id, firsts) == ("kept", [False])
    assert await pg_store.write(claim_start, "another", []) == ("kept", [])
