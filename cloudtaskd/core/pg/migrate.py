"""The PostgreSQL schema: brings a database up to SCHEMA_VERSION, once, whoever starts first.

Every replica calls `migrate` at start. The check and each upgrade run in one transaction under a
transaction-scoped advisory lock: a second replica starting at the same moment waits, then finds
the schema current and does nothing (PostgreSQL's DDL is transactional, so a migration that fails
leaves nothing half-made). The migrations are cloudtaskd/core/pg/sql/NNN_*.sql, numbered on their own:
they need not follow the SQLite ones one for one.
"""

from __future__ import annotations

import time
from importlib import resources

import structlog

from cloudtaskd.core.pg import locks
from cloudtaskd.core.pg.connect import Connection
from cloudtaskd.errors import StoreError

MIGRATIONS = ("001_initial.sql", "002_runs.sql", "003_open_jobs.sql", "004_bundles.sql", "005_upload_claims.sql")
SCHEMA_VERSION = len(MIGRATIONS)

log = structlog.get_logger("cloudtaskd.core.pg")

_VERSIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  DOUBLE PRECISION NOT NULL
)"""


def migration_sql(name: str) -> str:
    return resources.files("cloudtaskd.core.pg").joinpath("sql", name).read_text()


async def _value(conn: Connection, sql: str) -> object:
    row = await (await conn.execute(sql)).fetchone()
    return None if row is None else row[0]


async def schema_version(conn: Connection) -> int:
    """The version the database is at: 0 for an empty one."""
    if await _value(conn, "SELECT to_regclass('schema_migrations')") is None:
        return 0
    return int(str(await _value(conn, "SELECT coalesce(max(version), 0) FROM schema_migrations")))


async def migrate(conn: Connection) -> int:
    """Apply what is missing; return the schema version. Refuses a database newer than this code."""
    async with conn.transaction():
        # Released at commit or rollback, and with the session if this replica dies meanwhile.
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (locks.MIGRATE,))
        await conn.execute(_VERSIONS_TABLE)
        current = await schema_version(conn)
        if current > SCHEMA_VERSION:
            raise StoreError(f"the database has schema version {current}, newer than this cloudtaskd "
                             f"({SCHEMA_VERSION}); upgrade cloudtaskd on every replica")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            name = MIGRATIONS[version - 1]
            began = time.monotonic()
            # Without parameters psycopg sends the whole file as one simple-protocol query: all its
            # statements run, inside our transaction.
            await conn.execute(migration_sql(name))
            await conn.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                               (version, name, time.time()))
            log.info("pg_schema_migrated", version=version, migration=name,
                     duration_s=round(time.monotonic() - began, 3))
    return SCHEMA_VERSION
