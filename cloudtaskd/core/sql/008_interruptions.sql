-- Schema version 8: spot interruptions, counted per offer (type, zone, market) to steer selection.
ALTER TABLE instances ADD COLUMN interrupted_at REAL;  -- the cloud is taking it: its leases come back uncounted
ALTER TABLE instances ADD COLUMN at_risk_since REAL;   -- a rebalance recommendation: replaced, then drained
CREATE TABLE interruptions (
    id          INTEGER PRIMARY KEY,
    instance_id TEXT NOT NULL,
    offer_key   TEXT NOT NULL,   -- provider/zone/type/market, as Offer.key
    kind        TEXT NOT NULL,   -- interruption | rebalance
    source      TEXT NOT NULL,   -- aws | gcp | azure (the agent's notice), provider (gone without one)
    noticed_at  REAL NOT NULL,
    deadline    REAL,            -- when the cloud said it takes the instance
    detail      TEXT,
    UNIQUE (instance_id, kind)   -- an agent resends its notice after a reconnect
);
CREATE INDEX interruptions_noticed ON interruptions(noticed_at);
