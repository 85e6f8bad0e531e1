-- Schema version 15: a job submitted by `cloudtaskctl run` records that run (run_id, and run_owner,
-- "pid N on HOST", for messages), so the daemon can hold the job when that run is gone, and what was
-- submitted (submission: a hash of the task file and the worker), so the same command started again
-- resumes the job instead of queueing the work twice (cloudtaskd/http/runs.py).
ALTER TABLE jobs ADD COLUMN run_id TEXT;
ALTER TABLE jobs ADD COLUMN run_owner TEXT;
ALTER TABLE jobs ADD COLUMN submission TEXT;
CREATE INDEX jobs_submission ON jobs(submission) WHERE submission IS NOT NULL;
CREATE INDEX jobs_runs ON jobs(run_id) WHERE run_id IS NOT NULL AND state = 'active';
