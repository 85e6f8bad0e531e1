-- Schema version 16: a standing queue. A job created open (POST /v1/jobs {"open": true}) stays
-- active when every task it has is finished, taking more one at a time (POST /v1/jobs/{id}/tasks
-- with a single task), until it is closed (POST /v1/jobs/{id}/close). is_open: NULL an ordinary
-- job (as before), 1 open, 0 closed (it finishes as an ordinary job does, and takes no more tasks).
ALTER TABLE jobs ADD COLUMN is_open INTEGER;
