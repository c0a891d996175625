"""MetadataStore conformance: what era_kernel/store/base.py promises, checked the way the
engine relies on it, on every backend.

Every test takes ``backend`` (or ``store``, one opened on it) and so runs once per entry
of ``BACKENDS``: adding a backend is adding one entry there. Tests that need a store to
outlive its object (close and reopen, two store objects on one database) take
``persistent_backend`` and are skipped on backends that do not.

"The order calls are made": a plain method (``add_run``) makes its call when it is
called; a coroutine method makes it when the coroutine starts running, which for
``asyncio.gather`` arguments is in argument order.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import random
from dataclasses import dataclass
from typing import Any, Iterator

import pytest

from era_kernel.store.base import MetadataStore, SessionExists, store_for_url


@dataclass(frozen=True)
class Backend:
    url: str
    persistent: bool  # a second store object on the same URL sees the data, also after close

    def store(self) -> MetadataStore:
        return store_for_url(self.url)  # as the engine picks its store (ERA_STORE_URL)


@contextlib.contextmanager
def sqlite_file(tmp_path, request) -> Iterator[Backend]:
    yield Backend(f"sqlite:///{tmp_path / 'meta' / 'era.db'}", persistent=True)


@contextlib.contextmanager
def sqlite_memory(tmp_path, request) -> Iterator[Backend]:
    yield Backend("sqlite://:memory:", persistent=False)


@contextlib.contextmanager
def postgres(tmp_path, request) -> Iterator[Backend]:
    """A schema of its own on the test session's throwaway cluster (tests/conftest.py)."""
    cluster = request.getfixturevalue("postgres_cluster")
    schema, url = cluster.new_schema()
    try:
        yield Backend(url, persistent=True)
    finally:
        cluster.drop_schema(schema)


# The backends: a new one is one more entry here (a context manager yielding a Backend on
# a fresh, empty database, which it cleans up after).
BACKENDS = [
    pytest.param(sqlite_file, id="sqlite-file"),
    pytest.param(sqlite_memory, id="sqlite-memory"),
    pytest.param(postgres, id="postgres"),
]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Iterator[Backend]:
    with request.param(tmp_path, request) as b:
        yield b


@pytest.fixture
def persistent_backend(backend) -> Backend:
    if not backend.persistent:
        pytest.skip(f"{backend.url} does not outlive its store object")
    return backend


@pytest.fixture
async def store(backend):
    s = backend.store()
    await s.open()
    yield s
    await s.close()


TS = "2026-01-01T00:00:00.000Z"


def rec(sid: str, **fields: Any) -> dict[str, Any]:
    """A session record shaped like the engine's."""
    return {"id": sid, "created_at": TS, "last_run_at": None, "language": "python",
            "metadata": {}, "data": {}, **fields}


def run(n: int, **fields: Any) -> dict[str, Any]:
    """A run record shaped like the engine's."""
    return {"run_id": f"run-{n}", "code": f"print({n})", "started_at": TS, "exit_code": 0,
            "outputs": [{"type": "stream", "name": "stdout", "text": f"{n}\n"}], "stdout": f"{n}\n",
            "stderr": "", "duration_ms": 1.5, **fields}


async def queued_add_run(store: MetadataStore, *args: Any, **kwargs: Any) -> None:
    """``add_run`` called when this coroutine starts, as a gather argument's turn comes."""
    await store.add_run(*args, **kwargs)


def ids(records: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in records]


# JSON values a store must give back exactly: nesting, unicode (non-BMP too), NUL in a
# string, floats at the edges, integers past a double's precision, and the types kept
# apart (1.0 is a float, True is not 1).
AWKWARD = {
    "nested": {"a": {"b": {"c": [1, {"d": None}, [], {}]}}, "": "empty key"},
    "deep": [[[[[[[[[[{"x": "ten levels"}]]]]]]]]]],
    "unicode": "é 中文 ÿ \u202e rtl \U0001F389 \U00010348 \U0010FFFF",
    "unicode key \U0001F600": "value",
    "quotes": "\"'\\ ; DROP TABLE sessions; --",
    "controls": "nul \u0000 tab \t newline \n",
    "floats": [0.1, 1.5, -2.25, 1e308, 5e-324, 1.0, 3.141592653589793],
    "ints": [0, -1, 2**31, 2**53 + 1, -(2**63)],
    "bools": [True, False],
    "none": None,
    "empty": {"list": [], "dict": {}, "str": ""},
}


def assert_exactly(actual: Any, expected: Any) -> None:
    """Equal, and with the same JSON types (``==`` takes 1 == 1.0 == True)."""
    assert type(actual) is type(expected), (actual, expected)
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key in expected:
            assert_exactly(actual[key], expected[key])
    elif isinstance(expected, list):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_exactly(a, e)
    else:
        assert actual == expected


# ---- open and close -----------------------------------------------------------------------------
async def test_a_new_store_opens_empty_and_closes(backend):
    store = backend.store()
    assert isinstance(store, MetadataStore)
    await store.open()
    try:
        assert await store.list_sessions() == [] and await store.count_sessions() == 0
        assert await store.get_session("anything") is None
        assert await store.list_runs("anything") == []
    finally:
        await store.close()


async def test_reopening_the_same_database_works_every_time(persistent_backend):
    for life in range(3):  # the schema is made once, then found
        store = persistent_backend.store()
        await store.open()
        try:
            assert await store.count_sessions() == life
            await store.insert_session(rec(f"life-{life}"))
        finally:
            await store.close()


# ---- insert and get -----------------------------------------------------------------------------
async def test_insert_returns_the_record_with_its_seq_and_get_returns_the_same(store):
    record = rec("s1", metadata={"owner": "me"})
    stored = await store.insert_session(record)
    assert isinstance(stored["seq"], int) and not isinstance(stored["seq"], bool)
    assert stored == dict(record, seq=stored["seq"])
    assert await store.get_session("s1") == stored
    assert await store.list_sessions() == [stored]


async def test_seq_strictly_increases_and_is_never_reused(store):
    seqs = [(await store.insert_session(rec(f"s{i}")))["seq"] for i in range(5)]
    assert seqs == sorted(set(seqs))
    await store.delete_session("s4")  # the largest
    await store.delete_session("s2")
    again = await store.insert_session(rec("s4"))  # the same id back: a new, larger seq
    later = await store.insert_session(rec("s5"))
    assert seqs[-1] < again["seq"] < later["seq"]
    with pytest.raises(SessionExists):
        await store.insert_session(rec("s5"))
    assert (await store.insert_session(rec("s6")))["seq"] > later["seq"]  # a refused insert leaves the order intact


async def test_seq_is_never_reused_after_close_and_reopen(persistent_backend):
    store = persistent_backend.store()
    await store.open()
    top = 0
    for i in range(3):
        top = (await store.insert_session(rec(f"s{i}")))["seq"]
    await store.delete_session("s2")  # the largest: a store that used max(seq) + 1 would reuse it
    await store.delete_session("s1")
    await store.close()
    store = persistent_backend.store()
    await store.open()
    try:
        assert (await store.insert_session(rec("s2")))["seq"] > top
    finally:
        await store.close()


async def test_a_taken_id_raises_session_exists_and_changes_nothing(store):
    first = await store.insert_session(rec("dup", data={"v": 1}))
    with pytest.raises(SessionExists):
        await store.insert_session(rec("dup", data={"v": 2}))
    assert await store.get_session("dup") == first
    assert await store.list_sessions() == [first] and await store.count_sessions() == 1


async def test_get_of_an_absent_session_is_none(store):
    assert await store.get_session("never") is None
    await store.insert_session(rec("gone"))
    await store.delete_session("gone")
    assert await store.get_session("gone") is None
    await store.insert_session(rec("s10"))
    assert await store.get_session("s1") is None  # a prefix is not a match
    assert await store.get_session("S10") is None  # nor another case


async def test_records_handed_in_or_out_are_the_callers_to_change(store):
    record = rec("own", metadata={"k": [1]})
    stored = await store.insert_session(record)
    record["metadata"]["k"].append("in")
    stored["metadata"]["k"].append("out")
    stored["language"] = "changed"
    changes = {"data": {"x": [1]}}
    updated = await store.update_session("own", changes)
    changes["data"]["x"].append(2)
    updated["data"]["x"].append(3)
    (await store.get_session("own"))["data"]["x"].append(4)
    (await store.list_sessions())[0]["data"]["x"].append(5)
    r = run(1)
    await store.add_run("own", r)
    r["outputs"].append("later")
    (await store.list_runs("own"))[0]["outputs"].append("after")
    got = await store.get_session("own")
    assert got["metadata"] == {"k": [1]} and got["language"] == "python" and got["data"] == {"x": [1]}
    assert await store.list_runs("own") == [run(1)]


# ---- list and count -----------------------------------------------------------------------------
async def test_list_is_in_seq_order_and_each_record_carries_its_seq(store):
    # Neither the ids nor created_at (the wall clock can step back) give the order.
    for sid, created in [("b", "2026-01-02T00:00:00.000Z"), ("c", "2025-12-31T00:00:00.000Z"),
                         ("a", "2026-01-01T00:00:00.000Z"), ("a2", "2026-01-01T00:00:00.000Z")]:
        await store.insert_session(rec(sid, created_at=created))
    listed = await store.list_sessions()
    assert ids(listed) == ["b", "c", "a", "a2"]
    assert [r["seq"] for r in listed] == sorted({r["seq"] for r in listed})
    for record in listed:
        assert record == await store.get_session(record["id"])


async def test_list_limit_and_after_are_exact(store):
    seqs = [(await store.insert_session(rec(f"s{i}")))["seq"] for i in range(6)]
    assert ids(await store.list_sessions(limit=None)) == [f"s{i}" for i in range(6)]
    assert await store.list_sessions(limit=0) == []
    assert ids(await store.list_sessions(limit=1)) == ["s0"]
    assert ids(await store.list_sessions(limit=100)) == [f"s{i}" for i in range(6)]
    assert ids(await store.list_sessions(after=seqs[1])) == ["s2", "s3", "s4", "s5"]  # strictly greater
    assert ids(await store.list_sessions(limit=2, after=seqs[1])) == ["s2", "s3"]
    assert ids(await store.list_sessions(after=seqs[0] - 1)) == [f"s{i}" for i in range(6)]
    assert await store.list_sessions(after=seqs[-1]) == []
    assert await store.list_sessions(limit=3, after=seqs[-1] + 1000) == []
    await store.delete_session("s2")
    assert ids(await store.list_sessions(limit=2, after=seqs[2])) == ["s3", "s4"]  # a deleted seq still pages


async def test_store_pages_by_seq_stable_under_inserts_and_deletes(store):
    # Moved from tests/test_engine_sessions.py, where it ran on sqlite://:memory: only.
    for i in range(5):
        await store.insert_session({"id": f"s{i}", "created_at": "2026-01-01T00:00:00.000Z"})
    first = await store.list_sessions(limit=2)
    assert [r["id"] for r in first] == ["s0", "s1"]
    await store.delete_session("s1")  # the page's last record: the key still holds
    await store.delete_session("s3")
    await store.insert_session({"id": "s5", "created_at": "2025-01-01T00:00:00.000Z"})  # clock went back
    rest = await store.list_sessions(limit=10, after=first[-1]["seq"])
    assert [r["id"] for r in rest] == ["s2", "s4", "s5"]
    assert [r["id"] for r in await store.list_sessions()] == ["s0", "s2", "s4", "s5"]
    assert await store.list_sessions(limit=2, after=rest[-1]["seq"]) == []


@pytest.mark.parametrize("page_size", [1, 3, 7])
async def test_paging_through_everything_while_it_changes_has_no_gaps_or_repeats(store, page_size):
    """As the engine's passes (culling, bulk delete) and a client's cursor walk the list:
    every session there for the whole walk is seen once, those deleted before the walk
    reaches them never, those created during it once, and all in seq order."""
    rng = random.Random(page_size)
    alive: list[str] = []
    deleted_unseen: set[str] = set()
    inserted: list[str] = []
    counter = 0

    async def insert() -> None:
        nonlocal counter
        sid = f"p{counter:04d}"
        counter += 1
        await store.insert_session(rec(sid))
        alive.append(sid)
        inserted.append(sid)

    for _ in range(30):
        await insert()
    seen: list[dict[str, Any]] = []
    after = None
    for pages in range(1000):  # bounded: the walk outpaces the inserts once they stop
        page = await store.list_sessions(limit=page_size, after=after)
        assert len(page) <= page_size
        seen += page
        if len(page) < page_size:
            break
        after = page[-1]["seq"]
        seen_ids = {r["id"] for r in seen}
        # Between pages: the cursor's own record goes, another seen one goes, an unseen one
        # goes, and two are created.
        for victim in (page[-1]["id"], rng.choice(sorted(seen_ids & set(alive)) or [None]),
                       rng.choice(sorted(set(alive) - seen_ids) or [None])):
            if victim is not None and victim in alive:
                assert await store.delete_session(victim)
                alive.remove(victim)
                if victim not in seen_ids:
                    deleted_unseen.add(victim)
        if pages < 12:
            await insert()
            await insert()
    else:
        raise AssertionError("the walk never reached the end")
    assert [r["seq"] for r in seen] == sorted({r["seq"] for r in seen}), "in seq order, none twice"
    assert ids(seen) == [sid for sid in inserted if sid not in deleted_unseen]
    assert ids(await store.list_sessions()) == alive


async def test_count_follows_inserts_deletes_and_refusals(store):
    assert await store.count_sessions() == 0
    for i in range(4):
        await store.insert_session(rec(f"c{i}"))
    assert await store.count_sessions() == 4
    with pytest.raises(SessionExists):
        await store.insert_session(rec("c0"))
    await store.delete_session("c1")
    await store.delete_session("c1")
    await store.update_session("c2", {"n": 1})
    await store.add_run("c3", run(1), {"last_run_at": TS})
    assert await store.count_sessions() == 3 == len(await store.list_sessions())


# ---- update -------------------------------------------------------------------------------------
async def test_update_returns_the_new_record_and_changes_only_the_given_fields(store):
    stored = await store.insert_session(rec("u", metadata={"a": 1, "b": 2}, data={"keep": True}, code="x"))
    updated = await store.update_session("u", {"metadata": {"c": 3}, "last_run_at": TS, "new_field": [1],
                                               "code": None})
    # Top-level fields are replaced whole (metadata is not merged); a None is kept as None.
    expected = dict(stored, metadata={"c": 3}, last_run_at=TS, new_field=[1], code=None)
    assert updated == expected
    assert await store.get_session("u") == expected
    assert await store.list_sessions() == [expected]
    assert await store.update_session("u", {}) == expected


async def test_update_of_an_absent_session_is_none_and_creates_nothing(store):
    assert await store.update_session("ghost", {"data": {"x": 1}}) is None
    assert await store.get_session("ghost") is None and await store.count_sessions() == 0
    await store.insert_session(rec("gone"))
    await store.delete_session("gone")
    assert await store.update_session("gone", {"n": 1}) is None
    assert await store.get_session("gone") is None


async def test_update_leaves_other_sessions_alone(store):
    one = await store.insert_session(rec("one"))
    await store.insert_session(rec("two"))
    await store.update_session("two", {"data": {"v": 2}})
    assert await store.get_session("one") == one


async def test_json_values_round_trip_exactly(store):
    stored = await store.insert_session(rec("j", metadata=AWKWARD, data=AWKWARD, **{"top \U0001F600": AWKWARD}))
    for got in (stored, await store.get_session("j"), (await store.list_sessions())[0]):
        assert_exactly({k: v for k, v in got.items() if k != "seq"}, rec("j", metadata=AWKWARD, data=AWKWARD,
                                                                        **{"top \U0001F600": AWKWARD}))
    changes = {"data": {"inner": AWKWARD}, "last_run_at": "2026-02-03T04:05:06.789Z"}
    updated = await store.update_session("j", changes)
    assert_exactly(updated["data"], {"inner": AWKWARD})
    assert_exactly((await store.get_session("j"))["data"], {"inner": AWKWARD})
    await store.add_run("j", run(1, outputs=[AWKWARD], stdout=AWKWARD["unicode"]), {"data": AWKWARD})
    assert_exactly(await store.list_runs("j"), [run(1, outputs=[AWKWARD], stdout=AWKWARD["unicode"])])
    assert_exactly((await store.get_session("j"))["data"], AWKWARD)


async def test_non_finite_floats_in_a_session_survive_every_kind_of_update(store):
    """Python's json writes NaN and Infinity (code in a session can leave them in its data);
    a store keeps what it is given, through each way a session is changed."""
    import math

    await store.insert_session(rec("nan"))
    updated = await store.update_session("nan", {"data": {"x": float("nan"), "inf": float("inf")}})
    assert math.isnan(updated["data"]["x"]) and updated["data"]["inf"] == float("inf")
    await store.add_run("nan", run(1), {"last_run_at": TS})  # a change on top of a stored NaN
    await store.add_session_event("nan", {"type": "kernel_started"}, {"kernel": {"last_exit": float("-inf")}})
    got = await store.get_session("nan")
    assert math.isnan(got["data"]["x"]) and got["last_run_at"] == TS and got["kernel"]["last_exit"] == float("-inf")
    await store.update_session("nan", {"data": {"x": 1}})
    assert (await store.get_session("nan"))["data"] == {"x": 1} and await store.list_runs("nan") == [run(1)]


# ---- delete -------------------------------------------------------------------------------------
async def test_delete_says_whether_it_existed(store):
    await store.insert_session(rec("d"))
    assert await store.delete_session("d") is True
    assert await store.delete_session("d") is False
    assert await store.delete_session("never") is False
    assert await store.list_sessions() == []


async def test_delete_removes_the_sessions_runs_and_only_its_own(store):
    await store.insert_session(rec("d"))
    await store.insert_session(rec("other"))
    for n in range(3):
        await store.add_run("d", run(n))
    await store.add_run("other", run(9))
    assert await store.delete_session("d")
    assert await store.list_runs("d") == []
    await store.insert_session(rec("d"))  # a new session with the old id starts with no history
    assert await store.list_runs("d") == []
    assert await store.list_runs("other") == [run(9)]


async def test_a_run_for_a_deleted_session_is_not_kept(store):
    """The engine records a run in the background: its session can be deleted first. The
    store may refuse the run or drop it, but never keep it for a later session of that id."""
    await store.insert_session(rec("late"))
    assert await store.delete_session("late")
    pending = store.add_run("late", run(1), {"last_run_at": TS})
    with contextlib.suppress(Exception):
        await pending
    assert await store.get_session("late") is None and await store.count_sessions() == 0
    await store.insert_session(rec("late"))
    assert await store.list_runs("late") == []


# ---- add_run and list_runs ----------------------------------------------------------------------
async def test_add_run_is_queued_before_it_returns(store):
    assert not inspect.iscoroutinefunction(type(store).add_run)
    await store.insert_session(rec("r", data={"old": 1}))
    pending = store.add_run("r", run(1), session_changes={"last_run_at": TS, "data": {"new": 2}})
    assert inspect.isawaitable(pending) and not inspect.iscoroutine(pending)
    # Read without awaiting the write: the read comes after it, so it sees it.
    assert await store.list_runs("r") == [run(1)]
    record = await store.get_session("r")
    assert record["last_run_at"] == TS and record["data"] == {"new": 2}
    assert await pending is None


async def test_runs_queued_back_to_back_are_all_seen_in_order(store):
    await store.insert_session(rec("r"))
    pending = [store.add_run("r", run(n), {"data": {"last": n}}) for n in range(20)]
    assert [r["run_id"] for r in await store.list_runs("r")] == [f"run-{n}" for n in range(20)]
    assert (await store.get_session("r"))["data"] == {"last": 19}
    assert await asyncio.gather(*pending) == [None] * 20


async def test_add_run_without_session_changes_leaves_the_session_alone(store):
    stored = await store.insert_session(rec("r"))
    await store.add_run("r", run(1))
    await store.add_run("r", run(2), None)
    await store.add_run("r", run(3), {})
    assert await store.get_session("r") == stored
    await store.add_run("r", run(4), {"last_run_at": TS})
    assert await store.get_session("r") == dict(stored, last_run_at=TS)  # only the given field


async def test_list_runs_gives_the_newest_limit_runs_oldest_first(store):
    await store.insert_session(rec("r"))
    await store.insert_session(rec("other"))
    # Same timestamp, then the clock stepping back: the order is the order of the calls.
    for n in range(105):
        started = TS if n < 50 else "2020-01-01T00:00:00.000Z"
        await store.add_run("r", run(n, started_at=started))
        if n % 10 == 0:
            await store.add_run("other", run(1000 + n))
    names = lambda runs: [r["run_id"] for r in runs]  # noqa: E731
    assert names(await store.list_runs("r")) == [f"run-{n}" for n in range(5, 105)]  # default limit 100
    assert names(await store.list_runs("r", limit=3)) == ["run-102", "run-103", "run-104"]
    assert names(await store.list_runs("r", limit=1)) == ["run-104"]
    assert names(await store.list_runs("r", limit=500)) == [f"run-{n}" for n in range(105)]
    assert names(await store.list_runs("other", limit=500)) == [f"run-{1000 + n}" for n in range(0, 105, 10)]
    assert await store.list_runs("absent") == []
    assert (await store.list_runs("r", limit=1))[0] == run(104, started_at="2020-01-01T00:00:00.000Z")


# ---- the ordering contract ----------------------------------------------------------------------
async def test_interleaved_calls_apply_in_the_order_they_are_made(store):
    results = await asyncio.gather(
        store.insert_session(rec("a")),                     # 0
        store.get_session("a"),                             # 1
        store.update_session("a", {"n": 1}),                # 2
        queued_add_run(store, "a", run(1), {"n": 2}),       # 3
        store.get_session("a"),                             # 4
        store.list_runs("a"),                               # 5
        store.insert_session(rec("a")),                     # 6: taken
        store.count_sessions(),                             # 7
        store.delete_session("a"),                          # 8
        store.get_session("a"),                             # 9
        store.list_runs("a"),                               # 10
        store.update_session("a", {"n": 3}),                # 11
        store.insert_session(rec("a", n=4)),                # 12
        store.list_sessions(),                              # 13
        store.delete_session("a"),                          # 14
        store.delete_session("a"),                          # 15
        store.count_sessions(),                             # 16
        return_exceptions=True)
    first, again = results[0], results[12]
    assert first == dict(rec("a"), seq=first["seq"])
    assert results[1] == first
    assert results[2] == dict(first, n=1)
    assert results[3] is None
    assert results[4] == dict(first, n=2)
    assert results[5] == [run(1)]
    assert isinstance(results[6], SessionExists)
    assert results[7] == 1
    assert results[8] is True and results[9] is None and results[10] == [] and results[11] is None
    assert again == dict(rec("a", n=4), seq=again["seq"]) and again["seq"] > first["seq"]
    assert results[13] == [again]
    assert results[14] is True and results[15] is False and results[16] == 0


class Model:
    """The interface's promises as plain Python: what a store must answer, call by call."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}  # in seq order: a re-insert goes last
        self.runs: dict[str, list[dict[str, Any]]] = {}
        self.last_seq = -1

    def apply(self, op: tuple, actual: Any) -> Any:
        """The expected answer to ``op``; an insert's seq is taken from ``actual``, once it
        is checked to be larger than every one before it."""
        kind, sid, *args = op
        if kind == "insert":
            if sid in self.sessions:
                return SessionExists
            assert isinstance(actual, dict) and actual["seq"] > self.last_seq, (op, actual)
            self.last_seq = actual["seq"]
            self.sessions[sid] = dict(args[0], seq=actual["seq"])
            self.runs[sid] = []
            return copy.deepcopy(self.sessions[sid])
        if kind == "get":
            return copy.deepcopy(self.sessions.get(sid))
        if kind == "update":
            if sid not in self.sessions:
                return None
            self.sessions[sid].update(copy.deepcopy(args[0]))
            return copy.deepcopy(self.sessions[sid])
        if kind == "delete":
            self.runs.pop(sid, None)
            return self.sessions.pop(sid, None) is not None
        if kind == "add_run":
            if sid not in self.sessions:
                return "refused or dropped"
            self.runs[sid].append(copy.deepcopy(args[0]))
            self.sessions[sid].update(copy.deepcopy(args[1] or {}))
            return None
        if kind == "list_runs":
            return copy.deepcopy(self.runs.get(sid, [])[-args[0]:])
        if kind == "list":
            return copy.deepcopy(list(self.sessions.values())[:args[0]])
        if kind == "count":
            return len(self.sessions)
        raise AssertionError(kind)


def random_ops(rng: random.Random, n: int) -> list[tuple]:
    sids = ["a", "b", "c", "d"]
    ops: list[tuple] = []
    for i in range(n):
        sid = rng.choice(sids)
        kind = rng.choices(["insert", "get", "update", "delete", "add_run", "list_runs", "list", "count"],
                           weights=[3, 3, 3, 2, 5, 2, 2, 1])[0]
        if kind == "insert":
            ops.append((kind, sid, rec(sid, n=i, data={"i": i})))
        elif kind == "update":
            ops.append((kind, sid, rng.choice([{"n": i}, {"data": {"u": i}}, {"metadata": None}, {}])))
        elif kind == "add_run":
            ops.append((kind, sid, run(i), rng.choice([None, {"last_run_at": TS, "n": i}, {"data": {"r": i}}])))
        elif kind == "list_runs":
            ops.append((kind, sid, rng.choice([1, 2, 5, 100])))
        elif kind == "list":
            ops.append((kind, sid, rng.choice([1, 2, 10])))
        else:
            ops.append((kind, sid))
    return ops


def call(store: MetadataStore, op: tuple) -> Any:
    kind, sid, *args = op
    return {"insert": lambda: store.insert_session(*args), "get": lambda: store.get_session(sid),
            "update": lambda: store.update_session(sid, *args), "delete": lambda: store.delete_session(sid),
            "add_run": lambda: queued_add_run(store, sid, *args), "list_runs": lambda: store.list_runs(sid, *args),
            "list": lambda: store.list_sessions(limit=args[0]), "count": lambda: store.count_sessions()}[kind]()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_many_concurrent_calls_answer_as_if_made_one_by_one(store, seed):
    ops = random_ops(random.Random(seed), 400)
    results = await asyncio.gather(*(call(store, op) for op in ops), return_exceptions=True)
    model = Model()
    for i, (op, actual) in enumerate(zip(ops, results)):
        expected = model.apply(op, actual)
        if expected is SessionExists:
            assert isinstance(actual, SessionExists), (i, op, actual)
        elif expected == "refused or dropped":
            assert actual is None or isinstance(actual, Exception), (i, op, actual)
        else:
            assert actual == expected, (i, op)
    for sid in ("a", "b", "c", "d"):  # and the end state is the model's
        assert await store.get_session(sid) == model.sessions.get(sid)
        assert await store.list_runs(sid, 10_000) == model.runs.get(sid, [])
    assert await store.list_sessions() == list(model.sessions.values())


# ---- durability ---------------------------------------------------------------------------------
async def test_everything_survives_close_and_reopen(persistent_backend):
    store = persistent_backend.store()
    await store.open()
    kept = await store.insert_session(rec("kept", metadata=AWKWARD))
    await store.insert_session(rec("dropped"))
    await store.add_run("kept", run(1), {"last_run_at": TS})
    await store.add_run("dropped", run(2))
    await store.update_session("kept", {"data": {"v": 1}})
    await store.delete_session("dropped")
    await store.add_run("kept", run(3), {"data": {"v": 2}})
    await store.close()
    store = persistent_backend.store()
    await store.open()
    try:
        expected = dict(kept, last_run_at=TS, data={"v": 2})
        assert await store.get_session("kept") == expected
        assert await store.list_sessions() == [expected] and await store.count_sessions() == 1
        assert await store.list_runs("kept") == [run(1), run(3)]
        assert await store.get_session("dropped") is None and await store.list_runs("dropped") == []
    finally:
        await store.close()


async def test_runs_queued_before_close_are_applied_before_it(backend):
    """close is a call like any other: the runs queued before it land first. The engine
    awaits its background run records before closing the store, but a run its shutdown
    interrupts can queue its record after that wait, just before close."""
    store = backend.store()
    await store.open()
    await store.insert_session(rec("q"))
    pending = [store.add_run("q", run(n), {"data": {"last": n}}) for n in range(20)]
    await store.close()
    results = await asyncio.gather(*pending, return_exceptions=True)
    assert results == [None] * 20
    if backend.persistent:
        store = backend.store()
        await store.open()
        try:
            assert await store.list_runs("q") == [run(n) for n in range(20)]
            assert (await store.get_session("q"))["data"] == {"last": 19}
        finally:
            await store.close()


async def test_two_stores_on_one_database_see_each_other_and_share_seq(persistent_backend):
    """Two engines on one database (a shared ERA_STORE_URL): a write one has awaited, the
    other reads; seqs stay unique and growing across both."""
    one, two = persistent_backend.store(), persistent_backend.store()
    await one.open()
    await two.open()
    try:
        seqs = []
        for i in range(6):
            writer = one if i % 2 else two
            seqs.append((await writer.insert_session(rec(f"m{i}")))["seq"])
        assert seqs == sorted(set(seqs))
        await one.add_run("m0", run(1), {"n": 1})
        assert await two.list_runs("m0") == [run(1)] and (await two.get_session("m0"))["n"] == 1
        assert await two.delete_session("m1") and await one.get_session("m1") is None
        with pytest.raises(SessionExists):
            await one.insert_session(rec("m2"))
        assert ids(await one.list_sessions()) == ids(await two.list_sessions()) == ["m0", "m2", "m3", "m4", "m5"]
        assert await one.count_sessions() == await two.count_sessions() == 5
    finally:
        await one.close()
        await two.close()


# ---- SQLite-specific: not part of the interface -------------------------------------------------
async def test_schema_is_versioned_and_reopens(tmp_path):
    # Moved from tests/test_engine_durability.py.
    from era_kernel.store.sqlite import MIGRATIONS, SQLiteStore

    url = f"sqlite:///{tmp_path / 'era.db'}"
    store = SQLiteStore(url)
    await store.open()
    assert await store.schema_version() == len(MIGRATIONS)
    await store.insert_session({"id": "x", "created_at": "2026-01-01T00:00:00Z"})
    await store.close()
    store = SQLiteStore(url)
    await store.open()
    assert (await store.get_session("x"))["seq"] == 1
    await store.close()


# ---- run records and the journal (durable runs) ------------------------------------------------
async def test_a_run_record_moves_from_queued_to_finished_in_place(store):
    await store.insert_session(rec("s"))
    await store.add_run("s", run(1))
    await store.put_run("s", {"run_id": "r2", "status": "queued", "code": "1"})
    assert await store.get_run("s", "r2") == {"run_id": "r2", "status": "queued", "code": "1"}
    assert [r["run_id"] for r in await store.list_runs("s")] == ["run-1"], "the history is finished runs only"
    assert [(r["session_id"], r["run_id"]) for r in await store.unfinished_runs()] == [("s", "r2")]
    await store.put_run("s", {"run_id": "r2", "status": "running", "code": "1"})
    await store.add_run("s", run(3))
    await store.put_run("s", {"run_id": "r2", "status": "completed", "code": "1", "exit_code": 0},
                        {"last_run_at": TS})
    assert [r["run_id"] for r in await store.list_runs("s")] == ["run-1", "r2", "run-3"], "submission order kept"
    assert await store.unfinished_runs() == []
    assert (await store.get_session("s"))["last_run_at"] == TS
    assert await store.get_run("s", "nope") is None and await store.get_run("other", "r2") is None


async def test_unfinished_runs_of_every_session_in_submission_order(store):
    for sid in ("a", "b"):
        await store.insert_session(rec(sid))
    for n, (sid, status) in enumerate([("a", "running"), ("b", "queued"), ("a", "queued"), ("b", "failed")]):
        await store.put_run(sid, {"run_id": f"r{n}", "status": status})
    assert [(r["session_id"], r["run_id"], r["status"]) for r in await store.unfinished_runs()] == [
        ("a", "r0", "running"), ("b", "r1", "queued"), ("a", "r2", "queued")]


async def test_the_journal_appends_batches_and_reads_after_an_offset(store):
    await store.insert_session(rec("s"))
    await store.insert_session(rec("t"))
    assert await store.last_event_seq("s") == 0 and await store.read_events("s") == []
    pending = store.append_events("s", [{"seq": n, "run_id": "r1" if n < 4 else "r2", "type": "stdout",
                                         "content": f"{n}\n"} for n in range(1, 7)])
    assert not asyncio.iscoroutinefunction(store.append_events)
    assert [e["seq"] for e in await store.read_events("s")] == [1, 2, 3, 4, 5, 6], "a read after sees it"
    await pending
    await store.append_events("t", [{"seq": 1, "run_id": "x", "type": "stdout", "content": "t\n"}])
    assert [e["seq"] for e in await store.read_events("s", after=2, limit=3)] == [3, 4, 5]
    assert [e["seq"] for e in await store.read_events("s", after=0, run_id="r2")] == [4, 5, 6]
    assert await store.read_events("s", after=6) == []
    assert await store.last_event_seq("s") == 6 and await store.last_event_seq("t") == 1
    assert (await store.read_events("s", after=5))[0] == {"seq": 6, "run_id": "r2", "type": "stdout",
                                                          "content": "6\n"}
    await store.delete_session("s")
    assert await store.read_events("s") == [] and await store.last_event_seq("s") == 0
    assert [e["seq"] for e in await store.read_events("t")] == [1], "other sessions keep theirs"


async def test_history_written_before_run_records_survives_the_migration(tmp_path):
    """SQLite-specific: a store from before run records (schema 1) opens with its runs as
    finished run records, in their order."""
    import sqlite3

    from era_kernel.store.sqlite import MIGRATIONS, SQLiteStore

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version=1;")
    db.execute("INSERT INTO sessions (id, created_at, doc) VALUES ('s', ?, ?)", (TS, '{"id": "s", "seq": 1}'))
    for n in (1, 2):
        db.execute("INSERT INTO runs (session_id, started_at, exit_code, doc) VALUES ('s', ?, 0, ?)",
                   (TS, json.dumps(run(n))))
    db.commit()
    db.close()
    store = SQLiteStore(f"sqlite:///{path}")
    await store.open()
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        assert await store.list_runs("s") == [run(1), run(2)]
        assert await store.get_run("s", "run-2") == run(2) and await store.unfinished_runs() == []
    finally:
        await store.close()


# ---- session events (why a kernel went away) --------------------------------------------------
def kernel_event(n: int, **fields: Any) -> dict[str, Any]:
    """A session event shaped like the engine's (engine/session_log.py)."""
    return {"type": "kernel_culled", "reason": "idle", "at": TS, "message": f"event {n}", "idle_s": 2.5,
            "n": n, **fields}


async def test_session_events_are_queued_in_order_and_read_after_an_id(store):
    assert not inspect.iscoroutinefunction(type(store).add_session_event)
    await store.insert_session(rec("s"))
    await store.insert_session(rec("t"))
    pending = [store.add_session_event("s" if n % 3 else "t", kernel_event(n)) for n in range(9)]
    assert all(inspect.isawaitable(p) and not inspect.iscoroutine(p) for p in pending)
    # Read without awaiting the writes: the read comes after them, so it sees them.
    events = await store.list_session_events("s")
    assert [e["n"] for e in events] == [1, 2, 4, 5, 7, 8]
    assert events[0] == dict(kernel_event(1), id=events[0]["id"]), "the document as given, plus its id"
    ids_ = [e["id"] for e in events]
    assert ids_ == sorted(set(ids_)), "ids grow"
    assert await asyncio.gather(*pending) == [None] * 9
    assert [e["n"] for e in await store.list_session_events("s", after=ids_[1], limit=3)] == [4, 5, 7]
    assert [e["n"] for e in await store.list_session_events("t")] == [0, 3, 6], "each session its own"
    assert await store.list_session_events("s", after=ids_[-1]) == []
    assert await store.list_session_events("absent") == []
    assert len(await store.list_session_events("s", limit=1)) == 1
    assert [e["n"] for e in await store.list_session_events("s")] == [1, 2, 4, 5, 7, 8], "the default limit is 100"


async def test_a_session_event_applies_its_session_changes_in_the_same_call(store):
    stored = await store.insert_session(rec("s", data={"d": 1}))
    store.add_session_event("s", kernel_event(1))
    assert await store.get_session("s") == stored, "no changes: the record is left alone"
    exit_ = {"type": "kernel_died", "reason": "exit status 3", "at": TS}
    store.add_session_event("s", kernel_event(2, type="kernel_died"), {"last_exit": exit_})
    assert await store.get_session("s") == dict(stored, last_exit=exit_)


async def test_session_events_are_bounded_to_the_newest(store):
    from era_kernel.store.base import SESSION_EVENTS_KEPT

    await store.insert_session(rec("s"))
    await store.insert_session(rec("quiet"))
    await store.add_session_event("quiet", kernel_event(-1))
    total = SESSION_EVENTS_KEPT + 25
    await asyncio.gather(*[store.add_session_event("s", kernel_event(n)) for n in range(total)])
    kept = await store.list_session_events("s", limit=total)
    assert [e["n"] for e in kept] == list(range(25, total)), "the newest are kept, oldest first"
    first = kept[0]["id"]
    assert [e["n"] for e in await store.list_session_events("s", after=0, limit=2)] == [25, 26]
    assert (await store.list_session_events("s", after=first, limit=1))[0]["n"] == 26
    assert [e["n"] for e in await store.list_session_events("quiet")] == [-1], "other sessions keep theirs"


async def test_session_events_go_with_their_session_and_are_never_kept_for_a_later_one(store):
    await store.insert_session(rec("s"))
    await store.insert_session(rec("other"))
    for n in range(3):
        await store.add_session_event("s", kernel_event(n))
    await store.add_session_event("other", kernel_event(9))
    assert await store.delete_session("s")
    assert await store.list_session_events("s") == []
    late = store.add_session_event("s", kernel_event(4), {"last_exit": {"reason": "late"}})
    with contextlib.suppress(Exception):
        await late
    assert await store.get_session("s") is None
    await store.insert_session(rec("s"))
    assert await store.list_session_events("s") == [], "a new session of the old id starts with none"
    assert "last_exit" not in await store.get_session("s")
    assert [e["n"] for e in await store.list_session_events("other")] == [9]


async def test_session_events_survive_close_and_reopen(persistent_backend):
    store = persistent_backend.store()
    await store.open()
    await store.insert_session(rec("s"))
    pending = store.add_session_event("s", kernel_event(1, message=AWKWARD["unicode"]), {"last_exit": {"n": 1}})
    await store.close()  # the queued write lands before the store closes
    await pending
    store = persistent_backend.store()
    await store.open()
    try:
        events = await store.list_session_events("s")
        assert [e["message"] for e in events] == [AWKWARD["unicode"]]
        assert (await store.get_session("s"))["last_exit"] == {"n": 1}
        store.add_session_event("s", kernel_event(2))
        later = await store.list_session_events("s", after=events[0]["id"])
        assert [e["n"] for e in later] == [2] and later[0]["id"] > events[0]["id"]
    finally:
        await store.close()
