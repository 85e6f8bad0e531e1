-- The PostgreSQL schema's twin (pg/sql/005_upload_claims.sql): an upload's newest staged row. Not
-- written on SQLite, whose walk has no upper bound (one daemon, one writer).
ALTER TABLE uploads ADD COLUMN end_id INTEGER;
