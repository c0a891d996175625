"""Which replica serves a session: a lease in the store, held and renewed by its owner.

Replicas sharing one store (``ERA_STORE_URL=postgresql://...``) each serve the sessions
whose lease they hold (``MetadataStore.acquire_lease``). The first replica a session's
request reaches takes its lease, and keeps it by a heartbeat every third of
``ERA_LEASE_TTL``; a request reaching another replica is forwarded to the owner (the
server's, server/forwarding.py: the engine has no HTTP). When the owner's lease has
expired (it died, or stopped answering the store) the replica the request reached takes
the session over under the next fencing token: its kernel's in-memory state is lost (a
new kernel starts at the next run, and the session's log and journal say so), its files
come back from the workspace store, its journal continues where the store's ends, and
the runs it had queued run here.

Every write this replica makes for a session it owns is fenced by the lease's token
(``MetadataStore.fence``), so a replica that was paused past its lease and wakes up
cannot write over the new owner's work: its writes are refused, and its next heartbeat
tells it the lease is gone, upon which it stops the kernel and forgets the session.

Off (``ERA_LEASES=off``, or ``auto`` on a SQLite store): one server, no leases, no fences.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ..config import Settings
from ..errors import Moved
from ..store.base import MetadataStore
from .replicas import ReplicaRegistration

log = logging.getLogger("era.ownership")


@dataclass
class OwnershipHooks:
    """What the engine does when a session arrives here, or leaves."""

    taken_over: Callable[[str, str | None], Awaitable[None]]  # (session id, previous replica): before serving it
    lost: Callable[[str], Awaitable[None]]  # the lease went to another replica: stop serving it


def leases_enabled(settings: Settings) -> bool:
    mode = settings["ERA_LEASES"]
    if mode == "auto":
        return settings["ERA_STORE_URL"].split(":", 1)[0] in ("postgresql", "postgres")
    return mode == "on"


class Ownership:
    def __init__(self, settings: Settings, store: MetadataStore, replica: ReplicaRegistration, hooks: OwnershipHooks):
        self.enabled = leases_enabled(settings)
        self.ttl = float(settings["ERA_LEASE_TTL"])
        self.store = store
        self.replica = replica
        self.hooks = hooks
        self.held: dict[str, int] = {}  # session id -> the token this replica holds it under
        self._claims: dict[str, asyncio.Future] = {}  # one acquisition per session at a time
        self._addresses: dict[str, str] = {}  # replica id -> address, as the registry last said
        self._task: asyncio.Task | None = None
        self.taken_over = 0  # sessions this replica took over from another (stats)

    @property
    def me(self) -> str:
        return self.replica.id

    # ---- where a session is served ------------------------------------------------------
    async def locate(self, session_id: str, fresh: bool = False) -> str | None:
        """None when this replica serves the session (it holds the lease, or just took
        it: free, expired, or never held); else the address of the live replica that
        does. Takes the session over, when it has to, before it returns."""
        if not self.enabled or session_id in self.held:
            return None
        claim = self._claims.get(session_id)
        if claim is None:
            claim = self._claims[session_id] = asyncio.ensure_future(self._claim(session_id, fresh))
            claim.add_done_callback(lambda _: self._claims.pop(session_id, None))
        owner = await asyncio.shield(claim)
        if owner is None:
            return None
        return await self.address_of(owner)

    async def _claim(self, session_id: str, fresh: bool) -> str | None:
        lease = await self.store.acquire_lease(session_id, self.me, self.ttl)
        if lease["replica"] != self.me:
            return lease["replica"]
        self.store.fence(session_id, lease["token"])
        # It was someone's before (or ended): its kernel's state is gone. Not so for a new
        # session whose id an earlier, deleted one had (``fresh``: the token is that one's).
        if lease["token"] > 1 and not fresh:
            self.taken_over += 1
            log.info("session %s taken over from %s (token %d)", session_id, lease["previous"], lease["token"],
                     extra={"event": "session_taken_over", "session_id": session_id})
            await self.hooks.taken_over(session_id, lease["previous"])
        self.held[session_id] = lease["token"]
        return None

    async def address_of(self, replica_id: str) -> str:
        address = self._addresses.get(replica_id)
        if address is None:
            for replica in await self.store.list_replicas():
                if replica.get("address"):
                    self._addresses[replica["id"]] = replica["address"]
            address = self._addresses.get(replica_id)
        if address is None:
            raise Moved(f"the session is served by replica {replica_id}, which has no address in the registry; "
                        f"retry once its lease ends (at most {self.ttl:g} s, ERA_LEASE_TTL)")
        return address

    async def ensure_local(self, session_id: str) -> None:
        """For engine calls no request brought here (MCP, schedules, relays): Moved when
        another live replica serves the session."""
        owner = await self.locate(session_id)
        if owner is not None:
            raise Moved(f"session {session_id} is served by another replica ({owner}); send the request there "
                        "or through the balancer")

    async def serves(self, session_id: str) -> bool:
        """Whether this replica serves the session (taking it over when nobody does)."""
        try:
            return await self.locate(session_id) is None
        except Moved:
            return False

    async def created(self, session_id: str) -> None:
        """A session made here is served here from the start."""
        await self.locate(session_id, fresh=True)

    async def owners(self, session_ids: list[str]) -> dict[str, str | None]:
        """Who serves each session now: a replica id, or None (nobody: its lease is free
        or expired, and the next request's replica takes it)."""
        if not self.enabled:
            return {sid: self.me for sid in session_ids}
        found = {sid: self.me for sid in session_ids if sid in self.held}
        rest = [sid for sid in session_ids if sid not in found]
        if rest:
            leases = await self.store.get_leases(rest)
            for sid in rest:
                lease = leases.get(sid)
                found[sid] = lease["replica"] if lease and lease["expires_in"] > 0 else None
        return found

    async def deleted(self, session_id: str) -> None:
        """The session is gone: its lease ends (a token further), whoever held it; that
        owner's next heartbeat finds it lost and stops its kernel."""
        if self.enabled:
            self.held.pop(session_id, None)
            await self.store.end_lease(session_id)

    # ---- the heartbeat --------------------------------------------------------------------
    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._renew_forever(), name="era-lease-heartbeat")

    async def _renew_forever(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.ttl / 3)
            beats += 1
            try:
                await self.renew()
                if beats % 3 == 0:
                    await self.adopt()
            except Exception:  # a store blip: the next beat tries again (fencing covers the gap)
                log.warning("lease renewal failed", exc_info=True, extra={"event": "lease_renewal_failed"})

    async def adopt(self) -> list[str]:
        """Take over the sessions nobody serves that have runs still queued or running
        (their replica died): their queued runs run here without waiting for a request.
        Every replica tries, once a lease period; the store gives each session to one."""
        waiting = {run["session_id"] for run in await self.store.unfinished_runs()} - self.held.keys()
        if not waiting:
            return []
        adopted = []
        for sid, owner in (await self.owners(sorted(waiting))).items():
            if owner is None and await self.serves(sid):
                adopted.append(sid)
        return adopted

    async def renew(self) -> list[str]:
        """Extend every lease held; the ones lost meanwhile are dropped here."""
        if not self.held:
            return []
        lost = await self.store.renew_leases(self.me, dict(self.held), self.ttl)
        for sid in lost:
            await self.lose(sid)
        return lost

    async def lose(self, session_id: str) -> None:
        """Stop serving a session whose lease went elsewhere. Its fence stays at the old
        token, so anything still in flight for it is refused by the store."""
        if self.held.pop(session_id, None) is None:
            return
        log.warning("lease of session %s lost: another replica serves it now", session_id,
                    extra={"event": "lease_lost", "session_id": session_id})
        try:
            await self.hooks.lost(session_id)
        except Exception:
            log.exception("stopping lost session %s failed", session_id)

    async def stop(self) -> None:
        """A clean stop: end the heartbeat and every lease held, so that the next request
        for each session is served at once by another replica (no wait for expiry)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        held, self.held = self.held, {}
        for sid, token in held.items():
            try:
                await self.store.end_lease(sid, token)
            except Exception:
                log.warning("could not end the lease of %s", sid, exc_info=True, extra={"event": "error"})

    async def cluster_stats(self) -> dict[str, Any]:
        """Every live replica's load from the registry (heartbeats younger than three
        beats), and the totals: what /api/resources/stats adds to this replica's own."""
        live = [r for r in await self.store.list_replicas()
                if r["heartbeat_age"] < 3 * self.replica.settings["ERA_REPLICA_HEARTBEAT"] or r["id"] == self.me]
        return {"replicas": [{"id": r["id"], "address": r.get("address"), "live_kernels": r.get("live_kernels", 0),
                              "capacity": r.get("capacity"), "heartbeat_age": r["heartbeat_age"]} for r in live],
                "live_kernels": sum(r.get("live_kernels", 0) for r in live),
                "max_kernels": sum((r.get("capacity") or {}).get("max_kernels", 0) for r in live)}

    def stats(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "held": len(self.held), "taken_over": self.taken_over,
                "ttl_s": self.ttl}
