"""MetadataStore conformance, tenants: API keys (era_kernel/store/base.py
``insert_api_key`` ...) and sessions by owner, on every backend of
``test_metadata_store.BACKENDS``."""

from __future__ import annotations

import asyncio

import pytest

from era_kernel.store.base import KeyExists

from . import test_metadata_store as suite

backend, persistent_backend, store = suite.backend, suite.persistent_backend, suite.store


def key(key_id: str, name: str, **fields) -> dict:
    return {"id": key_id, "name": name, "hash": "ab" * 32, "created_at": suite.TS, "admin": False,
            "limits": {"sessions": 3, "runs_per_minute": None}, **fields}


async def test_keys_insert_get_list_keep_the_document(store):
    assert await store.list_api_keys() == [] and await store.get_api_key("k1") is None
    stored = await store.insert_api_key(key("k1", "alice"))
    assert stored == {**key("k1", "alice"), "revoked_at": None}
    await store.insert_api_key(key("k2", "bob", admin=True))
    assert await store.get_api_key("k2") == {**key("k2", "bob", admin=True), "revoked_at": None}
    assert [k["id"] for k in await store.list_api_keys()] == ["k1", "k2"]  # oldest first


async def test_keys_a_live_name_or_an_id_is_taken_once(store):
    await store.insert_api_key(key("k1", "alice"))
    with pytest.raises(KeyExists):
        await store.insert_api_key(key("k2", "alice"))
    with pytest.raises(KeyExists):
        await store.insert_api_key(key("k1", "carol"))
    assert [k["id"] for k in await store.list_api_keys()] == ["k1"]  # nothing of the refused ones


async def test_keys_revoke_by_name_or_id_once_and_the_name_is_free_again(store):
    await store.insert_api_key(key("k1", "alice"))
    await store.insert_api_key(key("k2", "bob"))
    revoked = await store.revoke_api_key("alice")
    assert revoked["id"] == "k1" and revoked["revoked_at"].endswith("Z")
    assert (await store.get_api_key("k1"))["revoked_at"] == revoked["revoked_at"]
    assert await store.revoke_api_key("alice") is None and await store.revoke_api_key("k1") is None
    assert await store.revoke_api_key("nobody") is None
    assert (await store.revoke_api_key("k2"))["name"] == "bob"  # by id
    await store.insert_api_key(key("k3", "alice"))  # a revoked key's name may be used again
    listed = await store.list_api_keys()
    assert [(k["id"], k["revoked_at"] is None) for k in listed] == [("k1", False), ("k2", False), ("k3", True)]


async def test_keys_two_creates_of_one_name_at_once_one_wins(store):
    results = await asyncio.gather(*(store.insert_api_key(key(f"k{i}", "same")) for i in range(5)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, KeyExists) for r in results if isinstance(r, Exception))


async def test_keys_kept_across_reopen(persistent_backend):
    first = persistent_backend.store()
    await first.open()
    await first.insert_api_key(key("k1", "alice"))
    await first.revoke_api_key("k1")
    await first.close()
    again = persistent_backend.store()
    await again.open()
    try:
        assert (await again.get_api_key("k1"))["revoked_at"] is not None
    finally:
        await again.close()


async def test_sessions_listed_and_counted_by_owner(store):
    for i, owner in enumerate(["a", "b", "a", None, "a"]):
        await store.insert_session(suite.rec(f"s{i}", **({"owner": owner} if owner else {})))
    assert suite.ids(await store.list_sessions(owner="a")) == ["s0", "s2", "s4"]
    assert suite.ids(await store.list_sessions(owner="a", limit=2)) == ["s0", "s2"]
    after = (await store.list_sessions(owner="a", limit=1))[0]["seq"]
    assert suite.ids(await store.list_sessions(owner="a", after=after)) == ["s2", "s4"]
    assert suite.ids(await store.list_sessions(owner="nobody")) == []
    assert len(await store.list_sessions()) == 5  # no owner: every session, ownerless ones too
    assert [await store.count_sessions(owner=o) for o in ("a", "b", "c")] == [3, 1, 0]
    assert await store.count_sessions() == 5
