"""Persistent sessions through the engine, on file://, memory:// and a real S3 server
(moto on loopback): files survive kernels, processes and machines; the files API and
the code agree; delete and duplicate reach the store."""

from __future__ import annotations

import shutil

import pytest

from era_kernel.config import Settings
from era_kernel.errors import BadRequest, NotFound
from era_kernel.sessions import SessionManager

from .conftest import short_tmpdir
from .conformance.test_workspace_store import s3_endpoint, store_spec  # noqa: F401  (fixtures: file, memory, s3)


class Machine:
    """An engine with its own data directory: a second one is another machine."""

    def __init__(self, tmp_path, name: str, store_spec: tuple[str, str]):
        self.runtime = short_tmpdir("erp")
        self.settings = Settings.from_env({}, data_dir=str(tmp_path / name), runtime_dir=str(self.runtime),
                                          workspace_url=store_spec[0], workspace_options=store_spec[1],
                                          store_url=f"sqlite:///{tmp_path / 'shared.db'}", pool_size=2)
        self.engine = SessionManager(self.settings)

    async def __aenter__(self) -> SessionManager:
        await self.engine.start()
        return self.engine

    async def __aexit__(self, *exc) -> None:
        await self.engine.shutdown()
        shutil.rmtree(self.runtime, ignore_errors=True)


async def test_files_follow_the_session_to_another_machine(tmp_path, store_spec):
    async with Machine(tmp_path, "a", store_spec) as a:
        await a.create({"id": "p1", "persistent": True})
        await a.write_file("p1", "data/in.csv", b"x,y\n1,2\n")
        r = await a.run("p1", {"code": "import os\nprint(open('data/in.csv').read().splitlines()[1])\n"
                                        "open('out.txt', 'w').write('made by code')\nos.remove('data/in.csv')"})
        assert r["stdout"] == "1,2\n"
        assert await a.read_file("p1", "out.txt") == b"made by code"
        listed = {f["path"]: f for f in await a.list_files("p1")}
        assert "out.txt" in listed and "data/in.csv" not in listed
        assert listed["out.txt"]["size"] == 12 and listed["out.txt"]["uploaded"].endswith("Z")
        doc = await a.get("p1")
        assert doc["file_count"] == len(listed) and doc["total_size_bytes"] == sum(f["size"] for f in listed.values())
    async with Machine(tmp_path, "b", store_spec) as b:  # same store and database, empty disk
        r = await b.run("p1", {"code": "import os; print(sorted(os.listdir('.')))"})
        assert "'out.txt'" in r["stdout"] and "in.csv" not in r["stdout"]
        assert await b.read_file("p1", "out.txt") == b"made by code"
        await b.delete_file("p1", "out.txt")
        with pytest.raises(NotFound):
            await b.read_file("p1", "out.txt")
        copy = await b.duplicate("p1", {"id": "p2"})
        assert copy["persistent"] is True
        await b.write_file("p1", "only-in-p1.txt", b"1")
        await b.delete("p1")
        assert not await b.files.store.exists("p1"), "delete removes every object of the session"
        assert await b.files.store.exists("p2")
        r = await b.run("p2", {"code": "import os; print(os.path.exists('only-in-p1.txt'))"})
        assert r["stdout"] == "False\n"


async def test_non_persistent_sessions_never_touch_the_store(tmp_path, store_spec):
    async with Machine(tmp_path, "a", store_spec) as a:
        await a.create({"id": "scratch"})
        await a.run("scratch", {"code": "open('f.txt', 'w').write('x')"})
        assert await a.read_file("scratch", "f.txt") == b"x"
        assert not await a.files.store.exists("scratch")


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../b", "a\\b", "nul\x00", "..", ""])
async def test_bad_paths_are_refused_through_the_engine(engine, session, path):
    with pytest.raises((BadRequest, NotFound)):
        await engine.write_file(session, path, b"x")
    with pytest.raises((BadRequest, NotFound)):
        await engine.read_file(session, path)


async def test_symlink_made_by_code_is_not_served(engine, session):
    await engine.run(session, {"code": "import os; os.symlink('/etc/passwd', 'p'); os.symlink('/', 'r')"})
    with pytest.raises((BadRequest, NotFound)):
        await engine.read_file(session, "p")
    with pytest.raises((BadRequest, NotFound)):
        await engine.read_file(session, "r/etc/passwd")
    assert {f["path"] for f in await engine.list_files(session)} <= {".session_data.json"}
