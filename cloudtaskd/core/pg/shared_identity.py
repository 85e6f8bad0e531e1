"""What every replica on a database must share, checked at start: the TLS CA, and the SSH key each
cloud provider logs in to its VMs with.

Agents pin the CA they were given and fail over to any replica's URL (docs/replicas.md), so a
replica serving a certificate from another CA would be found out only when an agent moves to it,
as a TLS verification error far from the cause. Likewise a cloud VM carries only the public key of
the replica that launched it: a leader with another key finds out only when that replica dies and
its SSH login to the VM is refused (no re-tunnelling, no gentle stop). So the first replica to start
records each fingerprint in the database (meta); a replica whose own differs refuses to start,
naming both and what to do. Two first replicas starting at once: the database decides (meta.claim),
the loser refuses. All of one replica's identities are claimed in one transaction: a refused
replica records nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cloudtaskd.core.tables import meta
from cloudtaskd.errors import SharedCaMismatch, SharedIdentityMismatch, SharedSshKeyMismatch, short_sha256

if TYPE_CHECKING:
    from cloudtaskd.config import Config
    from cloudtaskd.core.tables.tx import Tx


@dataclass(frozen=True)
class Identity:
    """One thing the replicas must agree on, as this replica has it."""

    meta_key: str  # where the replicas' fingerprint is recorded
    fingerprint: str  # this replica's, in the form people compare it in
    path: Path  # the file it comes from
    # The error for a replica whose fingerprint is not the recorded one (given that one).
    refuse: Callable[[str], SharedIdentityMismatch]
    event: str  # logged at start as <event>_recorded or <event>_matches
    log_fields: dict[str, str]  # with these fields


def tls_ca(sha256: str, ca_path: Path) -> Identity:
    """The CA agents and API clients pin: the SHA-256 of its certificate's DER, in hex (tls.ca_fingerprint)."""
    key = meta.TLS_CA_SHA256
    return Identity(key, sha256, ca_path, lambda recorded: SharedCaMismatch(
        own_sha256=sha256, recorded_sha256=recorded, ca_path=str(ca_path), reset_sql=meta.forget_sql(key),
        meta_key=key), "tls_ca", {"ca": str(ca_path), "sha256": short_sha256(sha256)})


def ssh_key(provider: str, fingerprint: str, key_path: Path) -> Identity:
    """The key a cloud provider logs in to its VMs with: OpenSSH's SHA256:… form (`ssh-keygen -lf`)."""
    key = meta.ssh_key_sha256(provider)
    return Identity(key, fingerprint, key_path, lambda recorded: SharedSshKeyMismatch(
        provider=provider, own_fingerprint=fingerprint, recorded_fingerprint=recorded, key_path=str(key_path),
        key_setting=f"providers.{provider}.ssh_key_file", reset_sql=meta.forget_sql(key), meta_key=key),
        "ssh_key", {"provider": provider, "key": str(key_path), "fingerprint": fingerprint})


def ca_pinned(config: Config) -> bool:
    """Whether anything pins this daemon's own CA, so that every replica must have the same one:
    agents do while agents.tls is on (always the daemon's CA: api.tls_cert replaces only the control
    API's certificate), and TCP API clients do when api.listen serves the daemon's own certificate
    (cloudtaskctl --ca-file, Prometheus' ca_file, behind one load balancer for all replicas)."""
    return config.agents.tls or bool(config.api.listen and not config.api.tls_cert)


def check(tx: Tx, identities: Sequence[Identity]) -> list[bool]:
    """Record each identity's fingerprint if none is recorded (True), accept it if it is the one
    recorded (False), or raise the identity's SharedIdentityMismatch naming both and what to do
    (the transaction, and with it whatever this call recorded, is then rolled back)."""
    firsts: list[bool] = []
    for identity in identities:
        recorded, first = meta.claim(tx, identity.meta_key, identity.fingerprint)
        if recorded != identity.fingerprint:
            raise identity.refuse(recorded)
        firsts.append(first)
    return firsts
