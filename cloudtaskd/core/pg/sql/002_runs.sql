-- SQLite's 015_runs.sql: the `cloudtaskctl run` a job belongs to, and what was submitted.
ALTER TABLE jobs ADD COLUMN run_id TEXT;
ALTER TABLE jobs ADD COLUMN run_owner TEXT;
ALTER TABLE jobs ADD COLUMN submission TEXT;
CREATE INDEX jobs_submission ON jobs(submission) WHERE submission IS NOT NULL;
CREATE INDEX jobs_runs ON jobs(run_id) WHERE run_id IS NOT NULL AND state = 'active';
