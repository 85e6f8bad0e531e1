"""One TLS CA for every replica on a database, checked at start.

Agents pin the CA they were given and fail over to any replica's URL (docs/replicas.md), so a
replica serving a certificate from another CA would be found out only when an agent moves to it,
as a TLS verification error far from the cause. The first replica to start records its CA's
fingerprint in the database (meta.tls_ca_sha256); any replica whose CA differs refuses to start.
Two first replicas starting at once: the database decides (meta.claim), the loser refuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cloudtaskd.core.tables import meta
from cloudtaskd.errors import SharedCaMismatch

if TYPE_CHECKING:
    from cloudtaskd.config import Config
    from cloudtaskd.core.tables.tx import Tx

def pinned(config: Config) -> bool:
    """Whether anything pins this daemon's own CA, so that every replica must have the same one:
    agents do while agents.tls is on (always the daemon's CA: api.tls_cert replaces only the control
    API's certificate), and TCP API clients do when api.listen serves the daemon's own certificate
    (cloudtaskctl --ca-file, Prometheus' ca_file, behind one load balancer for all replicas)."""
    return config.agents.tls or bool(config.api.listen and not config.api.tls_cert)


def check(tx: Tx, own_sha256: str, ca_path: Path) -> bool:
    """Record own_sha256 as the replicas' CA if none is recorded (True), accept it if it is the one
    recorded (False), or raise SharedCaMismatch naming both and what to do."""
    recorded, first = meta.claim(tx, meta.TLS_CA_SHA256, own_sha256)
    if recorded != own_sha256:
        raise SharedCaMismatch(own_sha256=own_sha256, recorded_sha256=recorded, ca_path=str(ca_path),
                               reset_sql=meta.FORGET_TLS_CA_SQL)
    return first
