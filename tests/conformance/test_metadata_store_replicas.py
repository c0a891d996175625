"""MetadataStore conformance, replicas: the registry of servers sharing one store
(era_kernel/store/base.py ``put_replica``), on every backend of
``test_metadata_store.BACKENDS``."""

from __future__ import annotations

import asyncio
from datetime import datetime

from . import test_metadata_store as suite

backend, persistent_backend, store = suite.backend, suite.persistent_backend, suite.store


def replica(rid: str, **fields) -> dict:
    return {"id": rid, "address": f"http://127.0.0.1:{9000 + len(rid)}", "capacity": {"max_kernels": 10}, **fields}


def document(listed: dict) -> dict:
    return {k: v for k, v in listed.items() if k not in ("heartbeat_at", "heartbeat_age")}


async def test_replicas_register_refresh_list_and_leave(store):
    assert await store.list_replicas() == []
    first = await store.put_replica(replica("r1"))
    assert document(first) == replica("r1") and first["heartbeat_age"] == 0
    await store.put_replica(replica("r2"))
    await asyncio.sleep(0.3)
    listed = await store.list_replicas()
    assert [document(r) for r in listed] == [replica("r1"), replica("r2")]
    assert all(0.25 <= r["heartbeat_age"] < 30 for r in listed), listed
    # A heartbeat: the document replaced, the place kept, the age back to (nearly) nothing.
    again = await store.put_replica(replica("r1", capacity={"max_kernels": 5}, live_kernels=3))
    listed = await store.list_replicas()
    assert [r["id"] for r in listed] == ["r1", "r2"]
    assert document(listed[0]) == replica("r1", capacity={"max_kernels": 5}, live_kernels=3)
    assert listed[0]["heartbeat_age"] < listed[1]["heartbeat_age"]
    assert listed[0]["heartbeat_at"] == again["heartbeat_at"] > listed[1]["heartbeat_at"]
    datetime.strptime(again["heartbeat_at"], "%Y-%m-%dT%H:%M:%S.%fZ")  # ISO UTC, like the engine's times
    assert await store.delete_replica("r1") is True
    assert await store.delete_replica("r1") is False
    assert [r["id"] for r in await store.list_replicas()] == ["r2"]


async def test_replicas_registered_through_one_store_are_seen_through_another(persistent_backend):
    one, two = persistent_backend.store(), persistent_backend.store()
    await one.open()
    await two.open()
    try:
        await asyncio.gather(one.put_replica(replica("a")), two.put_replica(replica("b")))
        assert sorted(r["id"] for r in await one.list_replicas()) == ["a", "b"]
        assert sorted(r["id"] for r in await two.list_replicas()) == ["a", "b"]
        assert await two.delete_replica("a")
        assert [r["id"] for r in await one.list_replicas()] == ["b"]
    finally:
        await one.close()
        await two.close()
