-- PostgreSQL only (no SQLite twin: one SQLite file serves one daemon, whose state directory holds
-- the bundle). The worker bundles' tarballs, so that every replica can materialize a worker that
-- another received (cloudtaskd/core/tables/bundles.py).
CREATE TABLE bundles (
    digest      TEXT PRIMARY KEY,
    tarball     BYTEA NOT NULL,
    size        BIGINT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL
);
