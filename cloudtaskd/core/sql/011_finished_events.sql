-- Schema version 10: `GET /v1/jobs/{id}/results?follow=1` reads a job's finished tasks in the
-- order they finished, from a cursor (an event id), through this partial index: one entry per
-- finished task, so a follower's read touches only the rows it sends, never the job's lease events.
-- The kinds are tables/events.FINISHED_KINDS, in the same order (the query names the index).
CREATE INDEX events_finished ON events(job_id, id) WHERE kind = 'task_succeeded' OR kind = 'task_dead'
    OR kind = 'lease_expired_dead' OR kind = 'task_cancelled';
