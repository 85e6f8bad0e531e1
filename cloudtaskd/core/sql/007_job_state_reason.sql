-- Schema version 7: why a job is in its state (a paused job says what it spent and how to go on).

ALTER TABLE jobs ADD COLUMN state_reason TEXT;
