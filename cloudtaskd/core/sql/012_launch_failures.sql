-- Schema version 12: launches that fail the same way every time are blocked (orchestrator/failures.py).
-- A job whose worker no offer can start any more is paused with pause_cause 'launch_failures'
-- (a job paused at its max_total_cost: 'budget'); cloudtaskctl run exits with its own status for it.
ALTER TABLE jobs ADD COLUMN pause_cause TEXT;
UPDATE jobs SET pause_cause = 'budget' WHERE state = 'paused';
-- The status page's errors index gains offer_blocked (tables/events.ERROR_KINDS, in the same order).
DROP INDEX events_errors;
CREATE INDEX events_errors ON events(id) WHERE kind = 'task_failed' OR kind = 'task_dead'
    OR kind = 'lease_expired' OR kind = 'lease_expired_dead' OR kind = 'instance_launch_failed'
    OR kind = 'instance_start_failed' OR kind = 'instance_lost' OR kind = 'job_paused'
    OR kind = 'spot_interruption' OR kind = 'offer_blocked';
