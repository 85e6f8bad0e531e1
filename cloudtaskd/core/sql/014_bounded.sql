-- Schema version 15: big jobs bounded (issue 15). A cancel and a delete touch a million rows: each
-- is recorded here and carried out in short chunks by the housekeeper (housekeeping.py), so dispatch
-- runs between them, memory stays flat, and a restart picks up where the last chunk left off.

-- A job being cancelled: marked cancelled at once (leasing skips the tasks of every job listed
-- here), its unfinished tasks cancelled a chunk at a time in rowid order. Gone after the last chunk.
CREATE TABLE cancels (
    job_id     INTEGER PRIMARY KEY,
    cursor     INTEGER NOT NULL,            -- the job's tasks at or below this rowid are done
    total      INTEGER NOT NULL,            -- its unfinished tasks when the cancel began
    done       INTEGER NOT NULL DEFAULT 0,  -- of those, cancelled so far
    started_at REAL NOT NULL
);

-- A deleted job: its row in jobs is gone at once (the API answers "no job N"); its tasks and events
-- are removed a chunk at a time. Job ids are not reused after a delete (meta.last_job_id), so no
-- newer job's rows carry this id.
CREATE TABLE purges (
    job_id       INTEGER PRIMARY KEY,
    task_cursor  INTEGER NOT NULL,  -- its tasks at or below this rowid are gone
    task_last    INTEGER NOT NULL,  -- the highest task rowid when it was deleted: the walk ends here
    event_cursor INTEGER NOT NULL,  -- as task_cursor, for its events
    event_last   INTEGER NOT NULL,
    tasks        INTEGER NOT NULL,  -- how many tasks it held
    started_at   REAL NOT NULL
);
