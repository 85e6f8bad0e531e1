-- Schema version 2: SSH host keys pinned on first use (or from the cloud / the config).

CREATE TABLE host_keys (
    address    TEXT NOT NULL,
    port       INTEGER NOT NULL,
    key        TEXT NOT NULL,       -- OpenSSH public key line
    pinned_at  REAL NOT NULL,
    PRIMARY KEY (address, port)
);
