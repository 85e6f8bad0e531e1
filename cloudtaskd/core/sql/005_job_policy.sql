-- Schema version 5: what a job allows (providers, regions, spot or on-demand, a price cap per
-- instance) and what it may cost in all.

ALTER TABLE jobs ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN max_total_cost REAL;
