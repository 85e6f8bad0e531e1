"""Which replica an upload under way belongs to: the one holding a session advisory lock keyed by
the upload's id, on a connection of its own kept for the upload's life (never a pooled one: the lock
belongs to the session). The server frees it when that session ends (the replica died, or its
connection did), so a replica that starts settles only the uploads whose lock it can take
(http/submissions.resume_uploads): never one another live replica is still receiving.

If the holder's session ends while the replica lives (the server restarted), another replica's
start may take the upload over; the upload's guarded state changes (tables/uploads.py) then let one
of the two settle it and refuse the other cleanly.
"""

from __future__ import annotations

import contextlib

import structlog

from cloudtaskd.core.pg import locks
from cloudtaskd.core.pg.connect import APPLICATION_NAME, CONNECT_ERRORS, Connection, connect

log = structlog.get_logger("cloudtaskd.core.pg")

KEEPALIVE_IDLE_S = 5  # a holder whose host vanished loses its claims within ~ this + 3 probes of 1 s


def _key(upload_id: int) -> int:
    if not 0 < upload_id < 2**32:
        raise ValueError(f"upload id {upload_id} does not fit an upload lock key")
    return locks.UPLOADS | upload_id


class Claim:
    """An upload this replica holds; release() when it is settled."""

    def __init__(self, upload_id: int, conn: Connection) -> None:
        self.upload_id = upload_id
        self._conn = conn

    async def release(self) -> None:
        # Closing the session frees the lock; nothing to wait for on a cut-off network.
        with contextlib.suppress(*CONNECT_ERRORS):
            await self._conn.close()


class UploadClaims:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def _open(self) -> Connection:
        return await connect(self.dsn, application_name=f"{APPLICATION_NAME} upload", server_settings={
            "tcp_keepalives_idle": str(KEEPALIVE_IDLE_S), "tcp_keepalives_interval": "1",
            "tcp_keepalives_count": "3"})

    async def take(self, upload_id: int) -> Claim | None:
        """The upload's lock if no live session holds it (its owner is gone, or it is new), else None."""
        conn = await self._open()
        try:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (_key(upload_id),))
            row = await cur.fetchone()
        except BaseException:
            with contextlib.suppress(*CONNECT_ERRORS):
                await conn.close()
            raise
        if row is None or not row[0]:
            with contextlib.suppress(*CONNECT_ERRORS):
                await conn.close()
            return None
        return Claim(upload_id, conn)
