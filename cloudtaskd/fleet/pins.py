"""Pinned SSH host keys, kept in the state database: by address for the `ssh` provider's fixed
hosts (table host_keys), by instance for cloud VMs (instances.host_key), whose addresses the
cloud hands to someone else once they are gone."""

from __future__ import annotations

from functools import partial

from cloudtaskd.core.store import Store, Tx
from cloudtaskd.core.tables import host_keys, instances


class AddressPins:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, address: str, port: int) -> str | None:
        return await self.store.read(partial(host_keys.get, address=address, port=port))

    async def set(self, address: str, port: int, key: str) -> None:
        def pin(tx: Tx) -> None:
            host_keys.pin(tx, address, port, key)
            tx.event("host_key_pinned", detail=f"{address}:{port}")
        await self.store.write(pin)


class InstancePins:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def get(self, instance_id: str) -> str | None:
        return await self.store.read(partial(instances.host_key, instance_id=instance_id))

    async def set(self, instance_id: str, key: str) -> None:
        def pin(tx: Tx) -> None:
            if instances.pin_host_key(tx, instance_id, key):  # first pin wins
                tx.event("host_key_pinned", instance_id=instance_id)
        await self.store.write(pin)
