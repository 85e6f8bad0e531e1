-- SQLite's 016_open_jobs.sql: a job that stays open for more tasks (NULL ordinary, 1 open, 0 closed).
ALTER TABLE jobs ADD COLUMN is_open INTEGER;
