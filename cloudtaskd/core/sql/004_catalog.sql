-- Schema version 4: the catalog of offers (type, zone, market) with sizes and list prices,
-- fetched from each provider's own APIs by `cloudtaskctl catalog refresh`, kept with its age.

CREATE TABLE catalog (
    provider       TEXT NOT NULL,
    zone           TEXT NOT NULL,
    machine_type   TEXT NOT NULL,
    spot           INTEGER NOT NULL,
    region         TEXT NOT NULL DEFAULT '',
    cpus           INTEGER NOT NULL,
    memory_gb      REAL,
    gpus           INTEGER NOT NULL DEFAULT 0,
    price_per_hour REAL,              -- USD; NULL when the provider did not say
    fetched_at     REAL NOT NULL,
    PRIMARY KEY (provider, zone, machine_type, spot)
);
