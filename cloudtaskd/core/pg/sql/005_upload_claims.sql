-- An upload's walk ends at its own newest staged row (end_id, kept as it stages), not at the table's:
-- a small upload's commit never walks the ids of a big one of another job staging meanwhile. And one
-- upload under way per job across the replicas: a commit or a rejection moves the job's staged rows,
-- so a second upload staging beside it would be queued (or deleted) with it. A second upload of the
-- job, on any replica, is refused (409) until the first is settled (tables/uploads.create).
ALTER TABLE uploads ADD COLUMN end_id BIGINT;
CREATE UNIQUE INDEX uploads_one_under_way ON uploads (job_id) WHERE state IN ('staging', 'committing', 'rejecting');
