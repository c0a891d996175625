"""Session lifecycle on the engine: create rules, bad input, patch, delete, duplicate, store."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import subprocess

import nbformat
import pytest

from era_kernel.engine import SessionManager
from era_kernel.errors import BadRequest, Conflict, EraError, NotFound, TooLarge, TooManyKernels

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
    ({"id": "rtNL\n"}, "id"),  # `$` matches before a trailing newline: patterns are fullmatched
    ({"session_id": "rtNL\n"}, "session_id"),
    ({"id": "../etc"}, "id"),
    ({"id": 5}, "id"),
    ({"language": "cobol"}, "language"),
    ({"language": "--privileged"}, "language"),
    ({"default_timeout": 0}, "default_timeout"),
    ({"default_timeout": -1}, "default_timeout"),
    ({"default_timeout": "10"}, "default_timeout"),
    ({"env": {"BAD-NAME": "x"}}, "env"),
    ({"env": {"FOO\n": "x"}}, "env"),
    ({"env": {"LONE": "half a pair \ud83d"}}, "env"),  # valid JSON, but no UTF-8 for the kernel
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
                        ({"code": "1", "env": {"FOO\n": "x"}}, "env"), ({"code": "1", "env": {"E": "\udc00"}}, "env"),
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


async def test_a_delete_that_cannot_remove_the_files_keeps_the_session(engine, session):
    """Files go first, the record last: a failed delete leaves the session listed (so it
    can be deleted again), never files on disk that no record owns."""
    if os.getuid() != 0 or shutil.which("chattr") is None:
        pytest.skip("needs root and chattr to make a file that cannot be removed")
    await engine.write_file(session, "deep/stuck.txt", b"x")
    workspace = engine.workspace_dir(session)
    stuck = workspace / "deep" / "stuck.txt"
    if engine.files.volumes.is_mounted(workspace):  # its files go with its volume's image
        stuck = engine.files.volumes.image(workspace)
    subprocess.run(["chattr", "+i", str(stuck)], check=True)  # immutable: even root cannot unlink it
    try:
        with pytest.raises(EraError) as err:
            await engine.delete(session)
        assert "retry" in err.value.message and type(err.value) is EraError  # no more specific kind: a 500
        assert [d["id"] for d in await engine.list()] == [session]
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=True)
    await engine.delete(session)
    assert await engine.list() == [] and not engine.workspace_dir(session).exists()
    assert not engine.files.volumes.image(workspace).exists()


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
        assert refused[0].retry_after  # Busy: the server answers 429 with Retry-After
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


# ---- bounded metadata and a paged listing: one answer never holds every session in full --------
async def test_oversized_metadata_is_refused_before_anything_is_written(engine):
    big = {"blob": "m" * 1024**2}
    with pytest.raises(TooLarge) as err:
        await engine.create({"id": "meta-big", "metadata": big})
    assert err.value.field == "metadata" and isinstance(err.value, TooLarge)  # 413
    assert await engine.list() == [] and engine.slots.used == 0
    assert not list((engine.settings.data_dir / "sessions").iterdir())
    await engine.create({"id": "meta-ok", "metadata": {"team": "a"}})
    with pytest.raises(TooLarge) as err:
        await engine.patch("meta-ok", {"metadata": big, "default_timeout": 7})
    assert err.value.field == "metadata"
    doc = await engine.get("meta-ok")
    assert doc["metadata"] == {"team": "a"} and doc["default_timeout"] != 7, "a refused patch changes nothing"
    # A record stored under a larger limit is not copied past the current one.
    engine.settings = engine.settings.replace(ERA_MAX_METADATA_BYTES=8)
    with pytest.raises(TooLarge) as err:
        await engine.duplicate("meta-ok", {"id": "meta-copy"})
    assert err.value.field == "metadata"
    assert [d["id"] for d in await engine.list()] == ["meta-ok"]


async def test_list_pages_with_an_opaque_cursor(engine):
    engine.settings = engine.settings.replace(ERA_LIST_MAX=50)
    for i in range(3):
        await engine.create({"id": f"pg-{i}"})
    page = await engine.list(limit=2)
    assert [d["id"] for d in page] == ["pg-0", "pg-1"] and isinstance(page.next_cursor, str)
    await engine.delete("pg-1")
    await engine.create({"id": "pg-3"})
    page2 = await engine.list(limit=2, cursor=page.next_cursor)
    assert [d["id"] for d in page2] == ["pg-2", "pg-3"] and page2.next_cursor is None  # nothing after: no cursor
    assert await engine.list(limit=1, cursor=page.next_cursor) == page2[:1]
    everything = await engine.list()
    assert [d["id"] for d in everything] == ["pg-0", "pg-2", "pg-3"] and everything.next_cursor is None
    for cursor in ("", "not-a-cursor", "!!!", "x" * 500, page.next_cursor + "A"):
        with pytest.raises(BadRequest) as err:
            await engine.list(cursor=cursor)
        assert err.value.field == "cursor"
    for limit in (0, -1, 51, "2", True):
        with pytest.raises(BadRequest) as err:
            await engine.list(limit=limit)
        assert err.value.field == "limit"
    # The cap on one answer: ERA_LIST_MAX documents, and ERA_LIST_MAX_BYTES of JSON.
    engine.settings = engine.settings.replace(ERA_LIST_MAX=2)
    capped = await engine.list()
    assert [d["id"] for d in capped] == ["pg-0", "pg-2"] and capped.next_cursor is not None
    engine.settings = engine.settings.replace(ERA_LIST_MAX=50, ERA_LIST_MAX_BYTES=1)
    one = await engine.list()  # always at least one document, so paging moves on
    assert [d["id"] for d in one] == ["pg-0"]
    assert [d["id"] for d in await engine.list(cursor=one.next_cursor)] == ["pg-2"]


async def test_a_session_nesting_directories_past_the_open_file_limit(engine, session):
    """Security finding (docs/security.md, "Deep directory trees"): code nested
    directories deeper than the server's open-file limit; every walk of the workspace
    then failed with EMFILE, so the session's document and the list of *all* sessions
    answered 500, and delete failed leaving the tree.
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


async def test_the_engines_own_settings_reach_its_kernels(era_settings, monkeypatch):
    """Provisioners used to read the process environment at launch: an engine built with
    bubblewrap and a 300 MiB memory limit ran what the environment said instead. The
    engine now hands its kernels typed launch options from its own settings."""
    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap installed")
    monkeypatch.setenv("ERA_SANDBOX", "none")
    monkeypatch.setenv("ERA_KERNEL_MEMORY", "2G")
    engine = SessionManager(era_settings.replace(ERA_SANDBOX="bwrap", ERA_KERNEL_MEMORY=300 * 1024**2))
    await engine.start()
    try:
        sid = (await engine.create({}))["id"]
        r = await engine.run(sid, {"code": "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"})
        assert r["stdout"] == f"{300 * 1024**2}\n", r
        assert engine.kernels[sid].km.provisioner.sandboxed is True
    finally:
        await engine.shutdown()


async def test_restarts_racing_runs_leave_one_kernel_and_one_slot(engine, session):
    """A restart does not wait for the run lock (it is how a stuck run is ended), so its
    background start can race a run's own cold start: each kernel holds exactly one slot,
    and the session ends with one kernel."""
    await engine.run(session, {"code": "1"})
    for _ in range(3):
        results = await asyncio.gather(engine.restart(session), engine.run(session, {"code": "print('ok')"}),
                                       engine.restart(session), return_exceptions=True)
        ran = results[1]
        assert not isinstance(ran, AssertionError), ran
        if isinstance(ran, dict):
            assert ran["stdout"] == "ok\n" or ran["exit_code"] != 0, ran  # a restart may kill it mid-run
    r = await engine.run(session, {"code": "print('settled')"})
    assert r["stdout"] == "settled\n"
    await engine.settle()
    assert list(engine.kernels) == [session] and engine.slots.used == 1
