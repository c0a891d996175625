"""The PostgreSQL store beyond the conformance suite (which checks what every backend
promises, tests/conformance/test_metadata_store*.py): the real server on it, whose sessions
outlive the process and which registers itself as a replica; migrations; doctor."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from era_kernel.store.postgres import PostgresStore

from .support.era_server import ServerProcess


def replicas(url: str, ghost: dict | None = None) -> list[dict]:
    """The replica registry, read as another server would: through a store of its own.
    With ``ghost``, first registered as a replica whose heartbeat is two days old."""
    async def read() -> list[dict]:
        store = PostgresStore(url)
        await store.open()
        try:
            if ghost is not None:
                await store.put_replica(ghost)
                async with store._pool.connection() as conn:  # the store has no way to age a heartbeat
                    await conn.execute("UPDATE replicas SET heartbeat_at = heartbeat_at - 2 * 86400 WHERE id = %s",
                                       (ghost["id"],))
            return await store.list_replicas()
        finally:
            await store.close()

    return asyncio.run(read())


def test_a_session_and_its_history_outlive_a_server_restart_on_postgres(postgres_cluster):
    schema, url = postgres_cluster.new_schema()
    # A replica that crashed two days ago (its heartbeat never renewed): forgotten at the next start.
    replicas(url, ghost={"id": "ghost", "address": "http://127.0.0.1:9", "capacity": {}, "live_kernels": 0})
    env = {"ERA_STORE_URL": url, "ERA_POOL_SIZE": "0", "ERA_REPLICA_HEARTBEAT": "0.2", "ERA_MAX_KERNELS": "7"}
    first = ServerProcess(env=env).start()
    data_dir = first.env["ERA_DATA_DIR"]
    second = None
    try:
        doc = first.json("POST", "/api/sessions", {"language": "python", "data": {"k": "v"}}, expect=201)
        sid = doc["id"]
        ran = first.json("POST", f"/api/sessions/{sid}/run", {"code": "x = 41\nprint(x + 1)"})
        assert ran["stdout"] == "42\n", ran
        history = first.json("GET", f"/api/sessions/{sid}/runs")
        # The server is in the replica registry: where it listens, what it holds, a live heartbeat.
        (registered,) = replicas(url)
        assert registered["address"] == first.base and registered["capacity"] == {"max_kernels": 7}
        # Heartbeats follow: a newer stamp, a fresh age and the load now (the session's kernel).
        deadline = time.monotonic() + 10
        while (beat := replicas(url)[0])["heartbeat_at"] == registered["heartbeat_at"] or beat["live_kernels"] != 1:
            assert time.monotonic() < deadline, ("no heartbeat", beat)
            time.sleep(0.1)
        assert beat["id"] == registered["id"] and beat["heartbeat_age"] < 5
        # The same through the API, from the server that answered.
        listed = first.json("GET", "/api/replicas")
        assert listed["replica"] == registered["id"] == first.json("GET", "/api/resources/stats")["replica"]
        assert [r["address"] for r in listed["replicas"]] == [first.base]
        assert first.stop() == 0
        assert replicas(url) == []  # a clean stop leaves the registry
        # The metadata went to PostgreSQL, not to a SQLite file beside the workspaces.
        assert not (Path(data_dir) / "era.db").exists()

        second = ServerProcess(env={**env, "ERA_DATA_DIR": data_dir}).start()
        (again_registered,) = replicas(url)
        assert again_registered["address"] == second.base and again_registered["id"] != registered["id"]
        again = second.json("GET", f"/api/sessions/{sid}")
        assert again["id"] == sid and again["data"] == {"k": "v"} and again["language"] == "python"
        assert second.json("GET", f"/api/sessions/{sid}/runs") == history
        (record,) = history["runs"]
        run_id = record["run_id"]
        assert second.json("GET", f"/api/sessions/{sid}/runs/{run_id}")["status"] == "completed"
        events = second.json("GET", f"/api/sessions/{sid}/runs/{run_id}/events")
        # The journal: the run's output, event by event.
        assert [e["content"] for e in events["events"] if e["type"] == "stdout"] == ["42\n"], events
        # The session carries on: a new kernel, the same session, one more run in its history.
        assert second.json("POST", f"/api/sessions/{sid}/run", {"code": "print('after')"})["stdout"] == "after\n"
        runs = second.json("GET", f"/api/sessions/{sid}/runs")["runs"]
        assert [r["run_id"] for r in runs][0] == run_id and len(runs) == 2
        assert [s["id"] for s in second.json("GET", "/api/sessions")["sessions"]] == [sid]
    finally:
        if second is not None:
            second.cleanup()
        first.cleanup()
        postgres_cluster.drop_schema(schema)


async def test_the_schema_is_migrated_once_and_a_newer_one_is_refused(postgres_cluster):
    import psycopg

    from era_kernel.store.postgres import MIGRATIONS

    schema, url = postgres_cluster.new_schema()
    try:
        # Replicas starting together on an empty database: one migrates, the other waits.
        stores = [PostgresStore(url) for _ in range(3)]
        await asyncio.gather(*(s.open() for s in stores))
        assert [await s.schema_version() for s in stores] == [len(MIGRATIONS)] * 3
        await stores[0].insert_session({"id": "x", "created_at": "2026-01-01T00:00:00Z"})
        for s in stores:
            await s.close()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            rows = await (await conn.execute("SELECT version FROM era_schema_migrations ORDER BY version")).fetchall()
            assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
            await conn.execute("INSERT INTO era_schema_migrations (version) VALUES (%s)", (len(MIGRATIONS) + 1,))
        newer = PostgresStore(url)
        with pytest.raises(RuntimeError, match="newer than this ERA"):
            await newer.open()
    finally:
        postgres_cluster.drop_schema(schema)


def test_a_store_url_is_reported_without_its_password():
    from era_kernel.store.base import url_without_password

    assert url_without_password("postgresql://era:s3cr@t@db:5432/era?sslmode=require") == \
        "postgresql://era:***@db:5432/era?sslmode=require"
    assert url_without_password("postgresql://era@/era?host=/run/postgresql") == "postgresql://era@/era?host=/run/postgresql"
    assert url_without_password("sqlite:///var/lib/era/era.db") == "sqlite:///var/lib/era/era.db"


def test_doctor_checks_the_postgres_store(postgres_cluster):
    from era_kernel.config import Settings
    from era_kernel.doctor import _store  # the check `era doctor` prints as its "store" line
    from era_kernel.store.postgres import MIGRATIONS

    def doctor(url: str) -> tuple[str, str, str]:
        return _store(Settings.from_env({}, store_url=url))

    schema, url = postgres_cluster.new_schema()
    try:
        assert doctor(url)[:2] == ("store", "OK") and "no schema yet" in doctor(url)[2]
        replicas(url)  # a store opened (and closed) on it: the schema is made
        assert f"schema {len(MIGRATIONS)} of {len(MIGRATIONS)}" in doctor(url)[2]
    finally:
        postgres_cluster.drop_schema(schema)
    name, status, detail = doctor(postgres_cluster.url(database="absent").replace("era@", "era:hunter2@"))
    assert status == "FAIL" and '"absent" does not exist' in detail and "hunter2" not in detail
