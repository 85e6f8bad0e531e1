"""Pinned SSH host keys, kept in the state database: by address for the `ssh` provider's fixed
hosts (table host_keys), by instance for cloud VMs (instances.host_key), whose addresses the
cloud hands to someone else once they are gone."""

from __future__ import annotations

from cloudtaskd.store import Store, Tx


class AddressPins:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, address: str, port: int) -> str | None:
        row = await self.store.fetchone("SELECT key FROM host_keys WHERE address = ? AND port = ?", (address, port))
        return str(row["key"]) if row is not None else None

    async def set(self, address: str, port: int, key: str) -> None:
        def pin(tx: Tx) -> None:
            tx.db.execute("INSERT OR IGNORE INTO host_keys (address, port, key, pinned_at) VALUES (?, ?, ?, ?)",
                          (address, port, key, tx.now))
            tx.event("host_key_pinned", detail=f"{address}:{port}")
        await self.store.write(pin)


class InstancePins:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, instance_id: str) -> str | None:
        row = await self.store.fetchone("SELECT host_key FROM instances WHERE id = ?", (instance_id,))
        return str(row["host_key"]) if row is not None and row["host_key"] else None

    async def set(self, instance_id: str, key: str) -> None:
        def pin(tx: Tx) -> None:
            # First pin wins: a later, different key must never replace it silently.
            cur = tx.db.execute("UPDATE instances SET host_key = ? WHERE id = ? AND host_key IS NULL",
                                (key, instance_id))
            if cur.rowcount:
                tx.event("host_key_pinned", instance_id=instance_id)
        await self.store.write(pin)
