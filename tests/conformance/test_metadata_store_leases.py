"""MetadataStore conformance, session leases and fencing (era_kernel/store/base.py
``acquire_lease``, ``fence``), on every backend of ``test_metadata_store.BACKENDS``: one
replica owns a session's live kernel at a time, and a replica that lost the lease
cannot write for the session any more."""

from __future__ import annotations

import asyncio

import pytest

from era_kernel.store.base import LeaseLost

from . import test_metadata_store as suite

backend, persistent_backend, store = suite.backend, suite.persistent_backend, suite.store

TTL = 0.4  # seconds: short, so that expiry is seen in the test


async def test_a_lease_is_acquired_renewed_refused_to_others_and_taken_over_after_expiry(store):
    first = await store.acquire_lease("s1", "r1", TTL)
    assert (first["replica"], first["token"], first["previous"]) == ("r1", 1, None)
    assert 0 < first["expires_in"] <= TTL + 1e-3
    # Held: another replica is told who holds it, and gets nothing.
    refused = await store.acquire_lease("s1", "r2", TTL)
    assert (refused["replica"], refused["token"]) == ("r1", 1)
    # The holder renews (acquire again, or the batched heartbeat): same token.
    assert (await store.acquire_lease("s1", "r1", TTL))["token"] == 1
    assert await store.renew_leases("r1", {"s1": 1}, TTL) == []
    await asyncio.sleep(TTL / 2)
    assert await store.renew_leases("r1", {"s1": 1}, TTL) == []
    await asyncio.sleep(TTL * 0.7)  # past the first expiry, not the renewed one
    assert (await store.acquire_lease("s1", "r2", TTL))["replica"] == "r1"
    # Expired: the next replica takes it over with the next token, naming the previous holder.
    await asyncio.sleep(TTL * 1.1)
    leases = await store.get_leases(["s1", "nope"])
    assert list(leases) == ["s1"] and leases["s1"]["expires_in"] < 0 and leases["s1"]["replica"] == "r1"
    taken = await store.acquire_lease("s1", "r2", TTL)
    assert (taken["replica"], taken["token"], taken["previous"]) == ("r2", 2, "r1")
    # The old holder's renewal says it lost the lease; the new holder's holds.
    assert await store.renew_leases("r1", {"s1": 1}, TTL) == ["s1"]
    assert await store.renew_leases("r2", {"s1": 2}, TTL) == []
    # Ending it (a clean stop) frees it and raises the token: the next holder gets a new one.
    assert not await store.end_lease("s1", token=1)  # a stale token ends nothing
    assert await store.end_lease("s1", token=2)
    assert (await store.get_leases(["s1"]))["s1"]["replica"] is None
    again = await store.acquire_lease("s1", "r2", TTL)
    assert (again["replica"], again["token"]) == ("r2", 4)


async def test_an_expired_lease_nobody_took_is_renewed_by_its_holder_under_the_same_token(store):
    await store.acquire_lease("s1", "r1", 0.05)
    await asyncio.sleep(0.1)
    assert await store.renew_leases("r1", {"s1": 1}, TTL) == []
    assert (await store.acquire_lease("s1", "r1", TTL))["token"] == 1


async def test_a_write_under_a_stale_fencing_token_is_refused_and_changes_nothing(store):
    await store.insert_session(suite.rec("s1", data={"v": 1}))
    lease = await store.acquire_lease("s1", "r1", 0.05)
    store.fence("s1", lease["token"])
    assert (await store.update_session("s1", {"data": {"v": 2}}))["data"] == {"v": 2}
    await store.put_run("s1", suite.run(1))
    await asyncio.sleep(0.1)
    # Taken over by r2 while r1 was away: r1's writes under token 1 are all refused.
    assert (await store.acquire_lease("s1", "r2", TTL))["token"] == 2
    with pytest.raises(LeaseLost):
        await store.update_session("s1", {"data": {"v": 3}})
    with pytest.raises(LeaseLost):
        await store.put_run("s1", suite.run(2), {"data": {"v": 4}})
    with pytest.raises(LeaseLost):
        await store.append_events("s1", [{"seq": 1, "run_id": "run_2", "type": "stdout", "content": "x"}])
    with pytest.raises(LeaseLost):
        await store.add_session_event("s1", {"kind": "kernel_started"}, {"last_exit": None})
    assert (await store.get_session("s1"))["data"] == {"v": 2}
    assert [r["run_id"] for r in await store.list_runs("s1")] == [suite.run(1)["run_id"]]
    assert await store.read_events("s1") == [] and await store.list_session_events("s1") == []
    # Under the new token the same writes land; unfenced (a single server) they always do.
    store.fence("s1", 2)
    assert (await store.update_session("s1", {"data": {"v": 5}}))["data"] == {"v": 5}
    store.fence("s1", None)
    assert (await store.update_session("s1", {"data": {"v": 6}}))["data"] == {"v": 6}


async def test_two_store_objects_racing_for_one_lease_give_it_to_exactly_one(persistent_backend):
    stores = [persistent_backend.store() for _ in range(2)]
    for s in stores:
        await s.open()
    try:
        for n in range(5):
            got = await asyncio.gather(*(s.acquire_lease(f"race{n}", f"r{i}", 5.0) for i, s in enumerate(stores)))
            holders = {g["replica"] for g in got}
            assert len(holders) == 1 and all(g["token"] == 1 for g in got), got
    finally:
        for s in stores:
            await s.close()
