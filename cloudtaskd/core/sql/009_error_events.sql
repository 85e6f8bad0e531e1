-- Schema version 9: the status page's "recent errors" finds the newest few error events through
-- this partial index instead of scanning back through millions of lease events. The kinds are
-- tables/events.ERROR_KINDS, in the same order (the query names the index: a mismatch fails loudly).
-- ORs, not IN (...): SQLite evaluates an IN list through a temporary table for every inserted
-- row (+1.6 us per event, 2.6x an insert); the ORs cost +0.18 us.
CREATE INDEX events_errors ON events(id) WHERE kind = 'task_failed' OR kind = 'task_dead'
    OR kind = 'lease_expired' OR kind = 'lease_expired_dead' OR kind = 'instance_launch_failed'
    OR kind = 'instance_start_failed' OR kind = 'instance_lost' OR kind = 'job_paused'
    OR kind = 'spot_interruption';
