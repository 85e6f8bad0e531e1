-- Schema version 10: how many times in a row a task's lease was granted and then found not held by
-- the agent at its next hello (the grant lost with the connection: a frame the agent refused, an
-- agent that died of it). At queue.MAX_LOST_GRANTS the attempt fails instead of requeueing for ever.
-- Reset by a heartbeat that lists the task (it arrived) and when an attempt fails.

ALTER TABLE tasks ADD COLUMN lost_grants INTEGER NOT NULL DEFAULT 0;
