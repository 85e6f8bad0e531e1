-- Schema version 6: two paths that held the writer too long.
-- An agent's hello (reclaim) and the reconciler look up what one instance holds (was a scan of
-- every leased row: 23 ms at 200k, per hello).
CREATE INDEX tasks_leased_by ON tasks(instance_id) WHERE state = 'leased';
-- Committing an upload walks the rowids from just below its first staged row (was
-- from 0: a scan of every older row, 38 ms for a 1-task upload into a 1M-row table).
ALTER TABLE uploads ADD COLUMN start_after INTEGER;  -- below its first staged row; NULL: from 0
