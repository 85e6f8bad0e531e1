-- Schema version 1. Applied in one transaction; PRAGMA user_version records it.

CREATE TABLE pools (             -- a worker bundle; an instance serves exactly one pool
    id          INTEGER PRIMARY KEY,
    digest      TEXT NOT NULL UNIQUE,  -- sha256 of the worker tarball
    spec        TEXT NOT NULL,         -- WorkerSpec as JSON
    path        TEXT NOT NULL,         -- where the bundle is extracted on the control host
    created_at  REAL NOT NULL
);

CREATE TABLE jobs (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,
    pool_id       INTEGER NOT NULL REFERENCES pools(id),
    state         TEXT NOT NULL,        -- active | cancelled
    created_at    REAL NOT NULL,
    finished_at   REAL,
    max_attempts  INTEGER NOT NULL,
    timeout_s     REAL,
    max_instances INTEGER,
    -- Per-state task counters, maintained in the same transaction as every task transition
    -- (a GROUP BY over a million rows per progress poll would be too slow).
    n_staged      INTEGER NOT NULL DEFAULT 0,
    n_queued      INTEGER NOT NULL DEFAULT 0,
    n_leased      INTEGER NOT NULL DEFAULT 0,
    n_failed      INTEGER NOT NULL DEFAULT 0,
    n_succeeded   INTEGER NOT NULL DEFAULT 0,
    n_dead        INTEGER NOT NULL DEFAULT 0,
    n_cancelled   INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY,
    job_id           INTEGER NOT NULL,
    pool_id          INTEGER NOT NULL,     -- denormalised from the job: the lease query's index key
    key              TEXT NOT NULL,        -- the user's id
    state            TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    data             TEXT NOT NULL,        -- JSON text, sent to agents verbatim
    timeout_s        REAL,                 -- effective: task, else worker spec, else config
    max_attempts     INTEGER NOT NULL,     -- effective: task, else job
    attempt          INTEGER NOT NULL DEFAULT 0,  -- fencing token of the latest lease
    failures         INTEGER NOT NULL DEFAULT 0,  -- failed attempts (handbacks do not count)
    run_at           REAL,                 -- state failed: when the retry is due
    lease_expires_at REAL,                 -- state leased: visibility timeout
    instance_id      TEXT,
    started_at       REAL,
    finished_at      REAL,
    duration_s       REAL,
    result           TEXT,                 -- JSON text
    error            TEXT
);
CREATE UNIQUE INDEX tasks_job_key ON tasks(job_id, key);
CREATE INDEX tasks_ready ON tasks(pool_id, priority DESC, id) WHERE state = 'queued';
CREATE INDEX tasks_leased ON tasks(lease_expires_at) WHERE state = 'leased';
CREATE INDEX tasks_retry ON tasks(run_at) WHERE state = 'failed';
CREATE INDEX tasks_finished ON tasks(job_id, finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE uploads (             -- one task-file upload; all of it is queued or none
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL,
    state       TEXT NOT NULL,     -- staging | committing | committed | rejected
    n_tasks     INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL
);

CREATE TABLE instances (
    id               TEXT PRIMARY KEY,
    provider         TEXT NOT NULL,
    pool_id          INTEGER,
    state            TEXT NOT NULL,
    slots            INTEGER NOT NULL,
    token_hash       TEXT NOT NULL,    -- sha256 of the agent's token; the token itself is never stored
    cloud_id         TEXT,             -- the provider's own handle (a pid for local, i-… for AWS)
    address          TEXT,
    offer            TEXT NOT NULL DEFAULT '{}',
    price_per_hour   REAL NOT NULL DEFAULT 0,
    created_at       REAL NOT NULL,
    state_changed_at REAL NOT NULL,
    started_at       REAL,
    last_seen_at     REAL,
    ended_at         REAL,
    last_error       TEXT
);
CREATE INDEX instances_live ON instances(state) WHERE state != 'stopped';

CREATE TABLE events (
    id          INTEGER PRIMARY KEY,
    ts          REAL NOT NULL,
    kind        TEXT NOT NULL,
    job_id      INTEGER,
    task_id     INTEGER,
    instance_id TEXT,
    detail      TEXT
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
