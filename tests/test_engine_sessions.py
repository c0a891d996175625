"""Session lifecycle on the engine: create rules, bad input, patch, delete, duplicate, store."""

from __future__ import annotations

import asyncio
import os
import re
import resource

import nbformat
import pytest

from era_kernel.errors import BadRequest, Conflict, NotFound, TooLarge, TooManyKernels

from .conftest import kernel_processes


async def test_create_custom_and_auto_ids(engine):
    doc = await engine.create({"id": "my-session_1", "metadata": {"owner": "me"}})
    assert doc["id"] == "my-session_1" and doc["language"] == "python" and doc["metadata"] == {"owner": "me"}
    assert doc["kernel"]["state"] in ("starting", "idle")
    auto = await engine.create({"session_id": None})
    assert re.fullmatch(r"sess_\d{13}_[0-9a-f]{8}", auto["id"])
    alias = await engine.create({"session_id": "via-alias", "language": "python3"})
    assert alias["id"] == "via-alias"
    with pytest.raises(Conflict):
        await engine.create({"id": "my-session_1"})
    assert {d["id"] for d in await engine.list()} == {"my-session_1", auto["id"], "via-alias"}


@pytest.mark.parametrize("body, field", [
    ({"id": "has space"}, "id"),
    ({"id": "a" * 129}, "id"),
    ({"id": "nul\x00id"}, "id"),
    ({"id": "rtl\u202eid"}, "id"),
    ({"id": "../etc"}, "id"),
    ({"id": 5}, "id"),
    ({"language": "cobol"}, "language"),
    ({"language": "--privileged"}, "language"),
    ({"default_timeout": 0}, "default_timeout"),
    ({"default_timeout": -1}, "default_timeout"),
    ({"default_timeout": "10"}, "default_timeout"),
    ({"env": {"BAD-NAME": "x"}}, "env"),
    ({"env": {"OK": 1}}, "env.OK"),
    ({"metadata": "not an object"}, "metadata"),
])
async def test_bad_create_input_names_the_field_and_leaves_nothing(engine, body, field):
    with pytest.raises(BadRequest) as err:
        await engine.create(body)
    assert err.value.field == field and field.split(".")[0] in err.value.message
    assert await engine.list() == []
    assert not list((engine.settings.data_dir / "sessions").iterdir())
    assert engine.slots.used == 0


async def test_oversized_data_is_refused(engine):
    with pytest.raises(TooLarge) as err:
        await engine.create({"data": {"blob": "x" * (129 * 1024)}})
    assert err.value.field == "data"
    assert await engine.list() == []


async def test_bad_run_input(engine, session):
    for body, field in [({"code": 123}, "code"), ({"code": "1", "timeout": 0}, "timeout"),
                        ({"code": "1", "timeout": -5}, "timeout"), ({"code": ["x"]}, "code")]:
        with pytest.raises(BadRequest) as err:
            await engine.run(session, body)
        assert err.value.field == field
    with pytest.raises(NotFound):
        await engine.run("no-such-session", {"code": "1"})


async def test_patch(engine, session):
    doc = await engine.patch(session, {"metadata": {"a": 1}, "default_timeout": 5, "allowInternetAccess": True})
    assert doc["metadata"] == {"a": 1} and doc["default_timeout"] == 5 and doc["allowInternetAccess"] is True
    with pytest.raises(BadRequest) as err:
        await engine.patch(session, {"default_timeout": 0})
    assert err.value.field == "default_timeout"
    assert (await engine.get(session))["default_timeout"] == 5, "a failed patch changes nothing"
    with pytest.raises(TooLarge):
        await engine.patch(session, {"data": {"x": "y" * 200_000}})


async def test_delete_stops_kernel_removes_workspace_and_record(engine, session):
    await engine.run(session, {"code": "open('f.txt', 'w').write('x')"})
    kernel_dir = engine.kernels[session].km.provisioner.kernel_dir
    assert kernel_processes(str(kernel_dir))
    await engine.delete(session)
    with pytest.raises(NotFound):
        await engine.get(session)
    assert not engine.workspace_dir(session).exists()
    assert not kernel_dir.exists()
    for _ in range(20):
        if not kernel_processes(str(kernel_dir)):
            break
        await asyncio.sleep(0.1)
    assert not kernel_processes(str(kernel_dir))
    with pytest.raises(NotFound):
        await engine.runs(session)


async def test_duplicate_copies_data_files_language_metadata_not_history(engine):
    src = await engine.create({"id": "src", "metadata": {"m": 1}, "data": {"d": 2}})
    await engine.run("src", {"code": "open('notes.txt', 'w').write('remember'); secret_var = 1"})
    copy = await engine.duplicate("src", {"id": "copy"})
    assert copy["id"] == "copy" and copy["metadata"] == {"m": 1} and copy["data"] == {"d": 2}
    assert copy["language"] == src["language"]
    r = await engine.run("copy", {"code": "print(open('notes.txt').read()); print('secret_var' in dir())"})
    assert r["stdout"] == "remember\nFalse\n"
    assert len(await engine.runs("copy")) == 1 and len(await engine.runs("src")) == 1
    with pytest.raises(Conflict):
        await engine.duplicate("src", {"id": "copy"})


async def test_bulk_delete(engine):
    for sid in ("job-1", "job-2", "keep"):
        await engine.create({"id": sid})
    assert sorted(await engine.delete_many(prefix="job-")) == ["job-1", "job-2"]
    assert [d["id"] for d in await engine.list()] == ["keep"]


async def test_history_and_notebook(engine, session):
    await engine.run(session, {"code": "print('one')"})
    await engine.run(session, {"code": "from IPython.display import Markdown; Markdown('**two**')"})
    await engine.run(session, {"code": "1/0"})
    runs = await engine.runs(session)
    assert [r["code"] for r in runs][-3:] == ["print('one')",
                                              "from IPython.display import Markdown; Markdown('**two**')", "1/0"]
    assert runs[-1]["exit_code"] == 1 and runs[0]["stdout"] == "one\n"
    nb = nbformat.from_dict(await engine.notebook(session))
    nbformat.validate(nb)
    assert len(nb.cells) == 3 and nb.cells[1].outputs[0]["data"]["text/markdown"] == "**two**"


async def test_kernel_limit_refuses_with_429_and_leaks_nothing(era_settings):
    from era_kernel.sessions import SessionManager

    engine = SessionManager(era_settings.replace(ERA_MAX_KERNELS=3))
    await engine.start()
    try:
        results = await asyncio.gather(*(engine.create({}) for _ in range(20)), return_exceptions=True)
        ok = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, TooManyKernels)]
        assert len(ok) == 3 and len(refused) == 17
        assert refused[0].status == 429 and refused[0].headers["Retry-After"]
        assert len(await engine.list()) == 3
        await engine.delete(ok[0]["id"])
        await engine.create({})  # a slot came back
    finally:
        await engine.shutdown()


async def test_longest_session_id_fits_ipc_limit(engine):
    sid = "x" * 128
    await engine.create({"id": sid})
    r = await engine.run(sid, {"code": "print('ok')"})
    assert r["stdout"] == "ok\n"


async def test_a_session_nesting_directories_past_the_open_file_limit(engine, session):
    """Security finding: code nested directories deeper than the server's open-file
    limit; every walk of the workspace then failed with EMFILE, so the session's document
    and the list of *all* sessions answered 500, and delete failed leaving the tree.
    The server is this process: its limit is lowered so a few hundred levels do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(os.listdir("/proc/self/fd")) + 200
    nest = (f"import os\nfor top in ('.', os.path.expanduser('~')):\n    fd = os.open(top, os.O_RDONLY)\n"
            f"    for _ in range({limit + 200}):\n        os.mkdir('d', dir_fd=fd)\n"
            "        child = os.open('d', os.O_RDONLY, dir_fd=fd)\n        os.close(fd)\n        fd = child\n"
            "    os.close(fd)\nopen('top.txt', 'w').write('12345')\nprint('nested')")
    assert (await engine.run(session, {"code": nest}))["stdout"] == "nested\n"
    kernel_dir = engine.kernels[session].km.provisioner.kernel_dir
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        assert (await engine.get(session))["file_count"] >= 1  # top.txt (and the data file) counted
        assert session in [doc["id"] for doc in await engine.list()]
        for call in (lambda: engine.list_files(session), lambda: engine.duplicate(session, {"id": "dup"})):
            with pytest.raises(TooLarge) as info:
                await call()
            assert "ERA_WORKSPACE_MAX_DEPTH" in info.value.message
        await engine.delete(session)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not engine.workspace_dir(session).exists() and not engine.workspace_dir("dup").exists()
    assert not kernel_dir.exists()
