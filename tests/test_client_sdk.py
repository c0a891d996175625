"""The Python SDK (clients/python, ``era_client``) against a real server on real kernels:
every method, the order of streamed callbacks, a connection dropped mid-stream, retries
on 429, timeouts, and the mapping of each error status to its exception."""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time

import pytest

import era_client
from era_client import _calls
from tests.conftest import ROOT
from tests.support.cutting_proxy import CuttingProxy
from tests.support.era_server import MAIN_ENV, ServerProcess, shared_server

PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


@pytest.fixture(scope="module")
def server():
    return shared_server()


@pytest.fixture(scope="module")
def client(server):
    with era_client.Client(server.base) as c:
        yield c


@pytest.fixture
def session(client):
    with client.sessions.create("python", data={"n": 1}) as s:
        yield s


def test_execute_and_typed_results(client):
    result = client.execute("import sys\nprint('out'); print('err', file=sys.stderr)\n6 * 7")
    assert (result.exit_code, result.stdout, result.stderr, result.text) == (0, "out\n", "err\n", "42")
    assert result.ok and result.error is None and result.run_id
    bash = client.execute("echo hi; exit 4", "bash")
    assert (bash.exit_code, bash.stdout) == (4, "hi\n")


def test_run_results_rich_outputs_and_session_data(session):
    result = session.run("import base64, json\nfrom IPython.display import Image, HTML, JSON, display\n"
                         f"display(Image(base64.b64decode('{PNG}')))\ndisplay(HTML('<i>x</i>'))\n"
                         "display(JSON({'a': 1}))\n"
                         "d = json.load(open('.session_data.json')); d['n'] += 1\n"
                         "json.dump(d, open('.session_data.json', 'w'))")
    assert result.png == base64.b64decode(PNG)
    assert result.html == "<i>x</i>" and result.json == {"a": 1} and result.data == {"n": 2}
    failed = session.run("raise ValueError('bad value')")
    assert failed.exit_code == 1 and failed.error.ename == "ValueError" and str(failed.error) == "ValueError: bad value"
    assert session.run("x = 5").text is None and session.run("x + 1").text == "6"  # state kept


def test_callbacks_come_in_the_order_the_kernel_emitted(session):
    seen: list[tuple[str, str]] = []
    result = session.run(
        "import sys, time\nfrom IPython.display import display, Markdown\n"
        "for i in range(3):\n    print('o', i, flush=True); time.sleep(0.05)\n"
        "    print('e', i, file=sys.stderr, flush=True); time.sleep(0.05)\n"
        "display(Markdown('*m*'))\nname = input('name? ')\nprint('hi', name)",
        on_stdout=lambda t: seen.append(("out", t)), on_stderr=lambda t: seen.append(("err", t)),
        on_display=lambda d: seen.append(("display", d.data["text/markdown"])),
        on_input=lambda prompt: seen.append(("input", prompt)) or "ada")
    assert seen == [("out", "o 0\n"), ("err", "e 0\n"), ("out", "o 1\n"), ("err", "e 1\n"), ("out", "o 2\n"),
                    ("err", "e 2\n"), ("display", "*m*"), ("input", "name? "), ("out", "hi ada\n")]
    assert result.exit_code == 0 and result.stdout.endswith("hi ada\n")


def test_stream_yields_typed_events(session):
    events = list(session.stream("print('a')\n1/0"))
    assert [type(e).__name__ for e in events] == ["Stdout", "Error", "Done"]
    assert events[0].content == "a\n" and events[1].ename == "ZeroDivisionError" and events[2].exit_code == 1
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3 and len({e.run_id for e in events}) == 1


def test_a_stream_resumes_after_a_dropped_connection_without_loss_or_repeats(server):
    proxy = CuttingProxy(server.port)
    try:
        with era_client.Client(proxy.base) as c, c.sessions.create("python") as s:
            stream = s.stream("import time\nfor i in range(12):\n    print(i, flush=True); time.sleep(0.15)")
            got = []
            for event in stream:
                got.append(event)
                if len(got) == 3:
                    before = proxy.accepted
                    proxy.cut()  # the network drops mid-run
            assert proxy.accepted > before  # it did reconnect
            out = [e.content for e in got if isinstance(e, era_client.Stdout)]
            assert out == [f"{i}\n" for i in range(12)]
            assert isinstance(got[-1], era_client.Done) and got[-1].exit_code == 0
    finally:
        proxy.close()


async def test_an_async_stream_resumes_too(server):
    proxy = CuttingProxy(server.port)
    try:
        async with era_client.AsyncClient(proxy.base) as c, await c.sessions.create("python") as s:
            got = []
            async for event in s.stream("import time\nfor i in range(8):\n    print(i, flush=True); time.sleep(0.15)"):
                got.append(event)
                if len(got) == 2:
                    before = proxy.accepted
                    proxy.cut()
            assert proxy.accepted > before
            assert [e.content for e in got if isinstance(e, era_client.Stdout)] == [f"{i}\n" for i in range(8)]
            assert isinstance(got[-1], era_client.Done)
    finally:
        proxy.close()


def test_background_runs_wait_events_and_replay(session):
    run = session.start("import time\nfor i in range(3):\n    print('t', i, flush=True); time.sleep(0.2)")
    assert run.status().status in ("queued", "running")
    result = run.wait(timeout=30)
    assert result.stdout == "t 0\nt 1\nt 2\n" and run.status().finished
    # How a print is cut into stream events is the kernel's business (under load one
    # line can come as two): compare the text, and the events after a point with the
    # same events read whole.
    events = run.events()
    stdout = [e for e in events if isinstance(e, era_client.Stdout)]
    assert "".join(e.content for e in stdout) == "t 0\nt 1\nt 2\n"
    middle = stdout[len(stdout) // 2].seq
    later = run.events(after=middle)
    assert [(e.seq, e.content) for e in later if isinstance(e, era_client.Stdout)] == \
        [(e.seq, e.content) for e in stdout if e.seq > middle]
    replay = [e.content for e in run.stream(after=0) if isinstance(e, era_client.Stdout)]
    assert replay == [e.content for e in stdout]
    slow = session.start("import time; time.sleep(30)")
    time.sleep(0.3)
    assert slow.cancel().status in ("cancelled", "interrupted", "running")
    assert slow.wait(timeout=30).exit_code != 0
    assert session.run_by_id(run.id).status().result.stdout == result.stdout


def test_files_and_directories(session, tmp_path):
    assert session.files.write("a/b.txt", "héllo")["size"] == len("héllo".encode())
    assert session.files.read_text("a/b.txt") == "héllo"
    session.files.write("bin.dat", bytes(range(256)))
    assert session.files.read("bin.dat") == bytes(range(256))
    src = tmp_path / "src"
    (src / "deep" / "er").mkdir(parents=True)
    (src / "top.txt").write_text("t")
    (src / "deep" / "er" / "x.py").write_text("print('x')")
    assert session.files.upload_dir(src, "proj") == ["proj/deep/er/x.py", "proj/top.txt"]
    assert session.run("exec(open('proj/deep/er/x.py').read())").stdout == "x\n"
    saved = session.files.download_dir(tmp_path / "back", "proj")
    assert sorted(p.relative_to(tmp_path / "back").as_posix() for p in saved) == ["deep/er/x.py", "top.txt"]
    assert (tmp_path / "back" / "deep" / "er" / "x.py").read_text() == "print('x')"
    session.files.delete("bin.dat")
    assert "bin.dat" not in {f["path"] for f in session.files.list()}
    with pytest.raises(era_client.NotFound):
        session.files.read("bin.dat")


def test_session_lifecycle_methods(client):
    with client.sessions.create("python", metadata={"owner": "t"}) as s:
        s.run("kept = 1")
        s.files.write("f.txt", "f")
        assert s.id in {x["id"] for x in client.sessions.list()}
        assert client.sessions.get(s.id).info["metadata"] == {"owner": "t"}
        assert s.patch(default_timeout=12)["default_timeout"] == 12
        assert s.refresh()["default_timeout"] == 12
        with s.duplicate() as copy:
            assert copy.files.read_text("f.txt") == "f" and copy.id != s.id
        with pytest.raises(era_client.NotFound):
            client.sessions.get(copy.id)  # the duplicate's context manager deleted it
        s.restart()
        assert s.run("kept").error.ename == "NameError"  # variables went with the kernel
        history = s.history()
        assert [h["code"] for h in history][-1] == "kept"
        notebook = s.notebook()
        assert notebook["nbformat"] == 4 and any(c["source"] == "kept = 1" for c in notebook["cells"])
        started = time.monotonic()
        threading.Timer(0.5, s.interrupt).start()
        interrupted = s.run("import time; time.sleep(20)")
        assert interrupted.error.ename == "KeyboardInterrupt" and time.monotonic() - started < 10
        with client.sessions.get(s.id):
            pass  # fetched, not created: its context manager leaves it
        assert client.sessions.get(s.id)
    with pytest.raises(era_client.NotFound):
        client.sessions.get(s.id)
    kept = client.sessions.create("python", delete_on_exit=False)
    with kept:
        pass
    client.sessions.get(kept.id).delete()


def test_timeouts_end_the_run_on_the_server(session, monkeypatch):
    result = session.run("import time; time.sleep(30)", timeout=1)
    assert result.timed_out and result.exit_code == 124
    # The client stops waiting before the server does: it interrupts the run rather than
    # leave it holding the session.
    monkeypatch.setattr(_calls, "RUN_TIMEOUT_MARGIN", -9.0)
    with pytest.raises(era_client.RunTimeout):
        session.run("import time; time.sleep(60)", timeout=10)
    monkeypatch.undo()
    started = time.monotonic()
    assert session.run("print('usable')").stdout == "usable\n"
    assert time.monotonic() - started < 8  # not queued behind a minute of sleep
    last = next(h for h in reversed(session.history()) if h["code"] == "import time; time.sleep(60)")
    assert last["error"]["ename"] == "KeyboardInterrupt"


def test_error_mapping(client, session, server):
    with pytest.raises(era_client.NotFound) as info:
        client.sessions.get("absent-session")
    assert info.value.status_code == 404 and "absent-session" in str(info.value)
    with pytest.raises(era_client.BadRequest) as info:
        session.run("1", env={"1BAD": "x"})
    assert info.value.field == "env"
    with pytest.raises(era_client.Conflict):
        client.sessions.create("python", id=session.id)
    with pytest.raises(era_client.PayloadTooLarge):
        session.files.write("big.bin", b"x" * (int(MAIN_ENV["ERA_MAX_BODY"]) + 1))
    with pytest.raises((era_client.BadRequest, era_client.Unprocessable)) as info:
        client.sessions.create("cobol")
    assert info.value.field == "language"
    with era_client.Client("http://127.0.0.1:9", max_retries=1) as nowhere:
        with pytest.raises(era_client.ConnectionLost):
            nowhere.health()


def test_unauthorized_without_the_key():
    srv = ServerProcess(env={"ERA_API_KEY": "sdk-key", "ERA_POOL_SIZE": "0"}).start()
    try:
        with era_client.Client(srv.base, "") as anonymous, pytest.raises(era_client.Unauthorized):
            anonymous.sessions.list()
        with era_client.Client(srv.base, "sdk-key") as keyed:
            with keyed.sessions.create("python") as s:
                assert s.run("print(1)", on_stdout=lambda t: None).stdout == "1\n"  # the WebSocket takes the key too
    finally:
        srv.cleanup()


def test_429_is_retried_after_retry_after():
    srv = ServerProcess(env={"ERA_RUN_QUEUE_MAX": "1", "ERA_POOL_SIZE": "0"}).start()
    try:
        with era_client.Client(srv.base, max_retries=0) as impatient, impatient.sessions.create("python") as s:
            s.run("1")
            s.start("import time; time.sleep(2)")
            s.start("pass")  # the one queue slot
            with pytest.raises(era_client.RateLimited) as info:
                s.start("pass")
            assert info.value.retry_after is not None and info.value.status_code == 429
            with era_client.Client(srv.base, max_retries=10) as patient:
                started = time.monotonic()
                run = patient.sessions.get(s.id).start("print('got in')")
                assert time.monotonic() - started >= 0.5  # it waited for room instead of failing
                assert run.wait(timeout=30).stdout == "got in\n"
    finally:
        srv.cleanup()


async def test_async_client(server):
    async with era_client.AsyncClient(server.base) as c:
        assert (await c.execute("print(3)")).stdout == "3\n"
        async with await c.sessions.create("python") as s:
            seen = []

            async def on_stdout(text):
                seen.append(text)

            result = await s.run("print('a'); print(input())", on_stdout=on_stdout, on_input=lambda p: "b")
            assert seen == ["a\n", "b\n"] and result.exit_code == 0
            events = [e async for e in s.stream("print('s')")]
            assert [type(e).__name__ for e in events] == ["Stdout", "Done"]
            run = await s.start("print('bg')")
            assert (await run.wait(timeout=30)).stdout == "bg\n"
            assert [e.content async for e in run.stream() if isinstance(e, era_client.Stdout)] == ["bg\n"]
            await s.files.write("x.txt", "x")
            assert await s.files.read_text("x.txt") == "x"
            sid = s.id
        with pytest.raises(era_client.NotFound):
            await c.sessions.get(sid)


def test_the_client_installs_on_its_own(tmp_path):
    """``pip install ./clients/python``: its own distribution, typed, needing no server code."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                    "--target", str(target), str(ROOT / "clients" / "python")],
                   check=True, capture_output=True, timeout=300)
    assert (target / "era_client" / "py.typed").exists()
    probe = ("import sys, era_client; assert era_client.__file__.startswith(sys.argv[1]), era_client.__file__; "
             "assert 'era_kernel' not in sys.modules and 'jupyter_client' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
