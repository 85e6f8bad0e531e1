-- Schema version 3: the SSH host key of each cloud VM, pinned per instance (cloud addresses are
-- reused, so an address is no key to pin by): taken from the cloud where it publishes it, else
-- trusted on first use.

ALTER TABLE instances ADD COLUMN host_key TEXT;
