-- Schema version 9: the status page's "recent errors" finds the newest few error events through
-- this partial index instead of scanning back through millions of lease events. The kinds are
-- observe.ERROR_KINDS, in the same order (the query names the index: a mismatch fails loudly).
CREATE INDEX events_errors ON events(id) WHERE kind IN ('task_failed', 'task_dead', 'lease_expired',
    'lease_expired_dead', 'instance_launch_failed', 'instance_start_failed', 'instance_lost', 'job_paused',
    'spot_interruption');
