"""This server's entry in the store's replica registry (MetadataStore.put_replica).

Servers sharing one store find each other there: each registers its id, the address the
others reach it at and its capacity when it starts, refreshes that (with its current
load) every ``ERA_REPLICA_HEARTBEAT`` seconds, and removes it when it stops cleanly. A
replica that died leaves a heartbeat that only ages: deciding it is gone is the reader's.
Registrations nobody has renewed for ``forgotten_after`` seconds are removed when a server
starts, so the ones of crashed processes (a new id at each start) do not pile up.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from typing import Any, Callable

from ..config import Settings
from ..store.base import MetadataStore
from .results import utc_now

log = logging.getLogger("era.replicas")

FORGET_AFTER_S = 24 * 3600  # a replica silent this long (and 100 heartbeats) is forgotten


def default_replica_id() -> str:
    # New at each start: a restarted process is a new replica, never mistaken for the old.
    return f"{socket.gethostname()}-{secrets.token_hex(4)}"


class ReplicaRegistration:
    def __init__(self, settings: Settings, store: MetadataStore, load: Callable[[], dict[str, Any]]):
        self.settings = settings
        self.store = store
        self.load = load  # this replica's current load (live kernels), read at each heartbeat
        self.id = settings["ERA_REPLICA_ID"] or default_replica_id()
        self.address = settings["ERA_REPLICA_ADDRESS"] or None  # the server fills it in once it is bound
        self.started_at = utc_now()
        self._task: asyncio.Task | None = None

    def document(self) -> dict[str, Any]:
        return {"id": self.id, "address": self.address, "started_at": self.started_at,
                "capacity": {"max_kernels": self.settings["ERA_MAX_KERNELS"]}, **self.load()}

    @property
    def forgotten_after(self) -> float:
        return max(FORGET_AFTER_S, 100 * self.settings["ERA_REPLICA_HEARTBEAT"])

    async def start(self) -> None:
        """Register (a store that refuses fails the start), then keep the heartbeat."""
        for replica in await self.store.list_replicas():
            if replica["heartbeat_age"] > self.forgotten_after:
                log.info("forgetting replica %s (silent for %.0f s)", replica["id"], replica["heartbeat_age"],
                         extra={"event": "replica_forgotten"})
                await self.store.delete_replica(replica["id"])
        await self.store.put_replica(self.document())
        self._task = asyncio.create_task(self._beat(), name="era-replica-heartbeat")

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.settings["ERA_REPLICA_HEARTBEAT"])
            try:
                await self.store.put_replica(self.document())
            except Exception:  # a store blip: the next beat tries again
                log.warning("replica heartbeat failed", exc_info=True, extra={"event": "replica_heartbeat_failed"})

    async def stop(self) -> None:
        """Stop beating and leave the registry (before the store closes)."""
        if self._task is None:
            return
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        try:
            await self.store.delete_replica(self.id)
        except Exception:
            log.warning("could not leave the replica registry", exc_info=True, extra={"event": "error"})
