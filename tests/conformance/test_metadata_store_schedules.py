"""MetadataStore conformance, schedules: what era_kernel/store/base.py promises about
schedules and their firings, on every backend of ``test_metadata_store.BACKENDS`` (the
same fixtures, so a new backend runs these too).

The claim is the point: two servers on one database must fire each slot once, so the
tests race claims through separate store objects, as two processes would.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import test_metadata_store as suite
from .test_metadata_store import TS, rec

# The suite's fixtures, so these tests run on each of its BACKENDS.
backend, persistent_backend, store = suite.backend, suite.persistent_backend, suite.store


def sch(sid: str, n: int, **fields: Any) -> dict[str, Any]:
    """A schedule document shaped like the engine's."""
    return {"id": f"sch_{sid}_{n}", "session_id": sid, "cron": "*/5 * * * *", "timezone": "UTC",
            "code": f"print({n})", "created_at": TS, **fields}


def slot(minute: int) -> str:
    return f"2026-01-01T00:{minute:02d}:00.000Z"


def listed(doc: dict[str, Any], last_slot: str | None = None, last_run_id: str | None = None) -> dict[str, Any]:
    return dict(doc, last_slot=last_slot, last_run_id=last_run_id)


async def test_put_list_and_delete_schedules(store):
    await store.insert_session(rec("a"))
    await store.insert_session(rec("b"))
    docs = [sch("a", 1), sch("b", 2), sch("a", 3)]
    for doc in docs:
        assert await store.put_schedule(doc) is True
    assert await store.list_schedules("a") == [listed(docs[0]), listed(docs[2])], "oldest first, own only"
    assert await store.list_schedules() == [listed(d) for d in docs]
    assert await store.list_schedules("absent") == []
    changed = dict(docs[0], cron="0 * * * *")
    assert await store.put_schedule(changed) is True  # a replace keeps the place in the listing
    assert await store.list_schedules("a") == [listed(changed), listed(docs[2])]
    assert await store.delete_schedule("b", docs[0]["id"]) is False, "another session's schedule is untouched"
    assert await store.delete_schedule("a", docs[0]["id"]) is True
    assert await store.delete_schedule("a", docs[0]["id"]) is False
    assert await store.list_schedules() == [listed(docs[1]), listed(docs[2])]


async def test_a_schedule_of_an_absent_session_is_not_stored(store):
    assert await store.put_schedule(sch("ghost", 1)) is False
    assert await store.list_schedules() == []


async def test_deleting_the_session_deletes_its_schedules_and_firings(store):
    await store.insert_session(rec("a"))
    await store.insert_session(rec("b"))
    await store.put_schedule(sch("a", 1))
    await store.put_schedule(sch("b", 2))
    assert await store.claim_firing("sch_a_1", slot(5), "r1")
    assert await store.delete_session("a")
    assert [s["id"] for s in await store.list_schedules()] == ["sch_b_2"]
    assert await store.claim_firing("sch_a_1", slot(10), "r2") is False, "a deleted schedule never fires"
    await store.insert_session(rec("a"))  # the same id again: nothing of the old one
    assert await store.list_schedules("a") == []
    await store.put_schedule(sch("a", 1))
    assert (await store.list_schedules("a"))[0]["last_slot"] is None


async def test_claims_give_last_slot_and_refuse_the_same_or_an_older_slot(store):
    await store.insert_session(rec("a"))
    doc = sch("a", 1)
    await store.put_schedule(doc)
    assert await store.claim_firing(doc["id"], slot(5), "r5") is True
    assert await store.list_schedules("a") == [listed(doc, slot(5), "r5")]
    assert await store.claim_firing(doc["id"], slot(5), "other") is False, "one claim per slot"
    assert await store.claim_firing(doc["id"], slot(10), "r10") is True
    assert await store.claim_firing(doc["id"], slot(5), "late") is False, "a scheduler behind never fires the past"
    assert await store.claim_firing(doc["id"], slot(15), None) is True  # a firing skipped: no run
    assert await store.list_schedules("a") == [listed(doc, slot(15), None)]
    assert await store.claim_firing("sch_absent", slot(20), "r") is False


async def test_update_schedule_changes_fields_and_never_brings_one_back(store):
    await store.insert_session(rec("a"))
    doc = sch("a", 1)
    await store.put_schedule(doc)
    await store.claim_firing(doc["id"], slot(5), "r5")
    skipped = {"slot": slot(10), "reason": "the run queue is full"}
    expected = listed(dict(doc, last_skipped=skipped), slot(5), "r5")
    assert await store.update_schedule(doc["id"], {"last_skipped": skipped}) == expected
    assert await store.list_schedules("a") == [expected]
    assert await store.delete_schedule("a", doc["id"])
    assert await store.update_schedule(doc["id"], {"last_skipped": None}) is None
    assert await store.list_schedules() == []


async def test_two_stores_racing_for_each_slot_claim_it_once(persistent_backend):
    """Two servers on one database wake for the same slot: for every slot exactly one
    claim wins, whichever store object makes it first."""
    one, two = persistent_backend.store(), persistent_backend.store()
    await one.open()
    await two.open()
    try:
        await one.insert_session(rec("a"))
        await one.put_schedule(sch("a", 1))
        wins: list[str] = []
        for minute in range(40):
            results = await asyncio.gather(one.claim_firing("sch_a_1", slot(minute), f"one-{minute}"),
                                           two.claim_firing("sch_a_1", slot(minute), f"two-{minute}"))
            assert sorted(results) == [False, True], (minute, results)
            wins.append("one" if results[0] else "two")
        last = (await two.list_schedules("a"))[0]
        assert last["last_slot"] == slot(39) and last["last_run_id"] == f"{wins[-1]}-39"
    finally:
        await one.close()
        await two.close()


async def test_many_claimers_on_one_slot_one_wins(persistent_backend):
    stores = [persistent_backend.store() for _ in range(4)]
    for s in stores:
        await s.open()
    try:
        await stores[0].insert_session(rec("a"))
        await stores[0].put_schedule(sch("a", 1))
        results = await asyncio.gather(*(s.claim_firing("sch_a_1", slot(1), f"r{i}")
                                          for i, s in enumerate(stores) for _ in range(5)))
        assert results.count(True) == 1
    finally:
        for s in stores:
            await s.close()
