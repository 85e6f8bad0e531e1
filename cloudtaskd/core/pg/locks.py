"""The advisory lock keys cloudtask takes, in one place so no two ever collide.

PostgreSQL's advisory locks are per database and keyed by one bigint; another application sharing
the database could pick the same number, so ours spell 'ctsk' in their high bytes.
"""

from __future__ import annotations

_PREFIX = int.from_bytes(b"ctsk") << 32

MIGRATE = _PREFIX | 1  # held (per transaction) while the schema is checked and upgraded
LEADER = _PREFIX | 2  # held (per session) by the one replica that runs the orchestrator
QUOTA = _PREFIX | 3  # held (per transaction) while a launch counts the live instances and inserts its row

# Per session, by the replica receiving an upload, for the upload's life: keyed UPLOADS + its id (below
# 2**32), so a replica that starts settles only uploads whose owner is gone (pg/upload_claims.py).
UPLOADS = int.from_bytes(b"ctsu") << 32
