"""Commands, background processes and terminals in a session (``engine.commands``), on
both provisioners, with real kernels: they run in the kernel's own sandbox (same uid,
workspace, /tmp, network namespace, environment, limits), a background server answers a
second command and the kernel, timeouts kill the process group, bad input is refused
naming its field, output is bounded, and deleting the session leaves no process or
container behind (SECURITY.md cases 4, 9, 12, 18, 19, 21)."""

from __future__ import annotations

import asyncio
import json

import pytest

from era_kernel.engine.records import session_uid
from era_kernel.errors import BadRequest, Conflict, NotFound

from .conftest import both_provisioners, kernel_processes

pytestmark = both_provisioners


async def _cmd(engine, sid, cmd, **body):
    return await engine.commands.run(sid, {"cmd": cmd, "shell": isinstance(cmd, str), **body})


def _sandbox_count(marker: str) -> int:
    """Host processes whose command line holds ``marker`` (containers' included: their
    processes are the host's too, in another pid namespace)."""
    return len(kernel_processes(marker))


async def _settles_to(count, expected, timeout: float = 15.0):
    """``count()`` once it equals ``expected`` (a kill or a container's removal takes a
    moment), or its last value after ``timeout``."""
    for _ in range(int(timeout * 10)):
        got = count()
        if got == expected:
            return got
        await asyncio.sleep(0.1)
    return count()


async def test_a_command_runs_as_the_kernel_does_and_sees_what_it_sees(engine):
    sid = (await engine.create({"language": "python", "env": {"FROM_SESSION": "s"}}))["id"]
    record = await engine._record(sid)
    r = await _cmd(engine, sid, "echo out; echo err >&2; pwd; id -u; echo \"$FROM_SESSION $EXTRA $ERA_SESSION_ID\"; "
                                "grep -E '^(NoNewPrivs|CapEff)' /proc/self/status; echo w > from-cmd.txt; exit 3",
                   env={"EXTRA": "e"})
    cwd = "/workspace" if record.provisioner == "docker" else str(engine.files.path(record).resolve())
    assert (r["exit_code"], r["stderr"], r["timed_out"], r["truncated"]) == (3, "err\n", False, False), r
    assert r["stdout"].split("\n") == ["out", cwd, str(session_uid(record)), f"s e {sid}",
                                       "CapEff:\t0000000000000000", "NoNewPrivs:\t1", ""]
    assert isinstance(r["pid"], int) and r["duration"].endswith("s")
    # argv form: nothing is parsed by a shell.
    r = await _cmd(engine, sid, ["printf", "%s|", "$HOME", "a b", ";true"])
    assert (r["exit_code"], r["stdout"]) == (0, "$HOME|a b|;true|")
    # The session's files: the files API and the kernel see what the command wrote.
    assert await engine.read_file(sid, "from-cmd.txt") == b"w\n"
    k = await engine.run(sid, {"code": "import os, json\nprint(open('from-cmd.txt').read().strip())\n"
                                       "print(json.dumps(dict(os.environ)))"})
    lines = k["stdout"].split("\n")
    assert lines[0] == "w", k
    # One environment: what the kernel's code has, a command has too (PATH and HOME included).
    kernel_env = json.loads(lines[1])
    env = dict(line.split("=", 1) for line in (await _cmd(engine, sid, ["env"]))["stdout"].splitlines() if "=" in line)
    for key in ("PATH", "HOME", "ERA_SESSION", "ERA_SESSION_ID", "ERA_LANGUAGE", "FROM_SESSION"):
        assert env.get(key) == kernel_env.get(key), key
    # stdin, and cwd below the workspace
    await _cmd(engine, sid, "mkdir -p sub/dir")
    r = await _cmd(engine, sid, ["bash", "-c", "pwd; cat"], cwd="sub/dir", stdin="fed\n")
    assert r["stdout"] == f"{cwd}/sub/dir\nfed\n", r


async def test_a_background_server_answers_another_command_and_the_kernel(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    server = await engine.commands.run(sid, {"cmd": ["python3", "-u", "-m", "http.server", "8731", "--bind",
                                                     "127.0.0.1"], "background": True})
    assert server["state"] == "running" and server["kind"] == "background", server
    pid = server["pid"]
    fetch = "import urllib.request as u\nprint(u.urlopen('http://127.0.0.1:8731/', timeout=5).status)"
    for _ in range(100):  # until it listens
        r = await _cmd(engine, sid, ["python3", "-c", fetch])
        if r["exit_code"] == 0:
            break
        await asyncio.sleep(0.1)
    assert (r["exit_code"], r["stdout"]) == (0, "200\n"), r
    k = await engine.run(sid, {"code": fetch})
    assert k["stdout"] == "200\n", k
    listed = {p["pid"]: p for p in await engine.commands.list(sid)}
    assert listed[pid]["state"] == "running" and listed[pid]["cmd"][:3] == ["python3", "-u", "-m"]
    page = await engine.commands.output(sid, pid, 0, wait=5)
    text = "".join(e.get("content", "") for e in page["events"])
    assert "Serving HTTP" in text, page
    later = await engine.commands.output(sid, pid, page["next"])
    assert all(e["seq"] > page["next"] for e in later["events"])
    await engine.commands.send_signal(sid, pid, {"signal": "TERM"})
    process = await engine.commands.process(sid, pid)
    await asyncio.wait_for(process.done.wait(), 10)
    assert (process.state, process.exit_code) == ("exited", 143)
    end = await engine.commands.output(sid, pid, 0)
    assert end["events"][-1]["type"] == "exit" and end["events"][-1]["exit_code"] == 143
    with pytest.raises(Conflict):
        await engine.commands.send_signal(sid, pid, {"signal": "KILL"})

    # stdin of a background process, then EOF
    cat = await engine.commands.run(sid, {"cmd": ["cat"], "background": True})
    await engine.commands.write_stdin(sid, cat["pid"], {"data": "line one\n"})
    await engine.commands.write_stdin(sid, cat["pid"], {"data": "line two\n", "eof": True})
    process = await engine.commands.process(sid, cat["pid"])
    await asyncio.wait_for(process.done.wait(), 10)
    out = await engine.commands.output(sid, cat["pid"], 0)
    assert "".join(e.get("content", "") for e in out["events"]) == "line one\nline two\n"
    assert process.exit_code == 0


async def test_timeout_kills_the_group_with_124_and_output_is_bounded(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    r = await _cmd(engine, sid, "echo start; sleep 301 & sleep 302; echo never", timeout=1)
    assert (r["exit_code"], r["timed_out"], r["stdout"]) == (124, True, "start\n"), r
    assert await _settles_to(lambda: _sandbox_count("sleep 301") + _sandbox_count("sleep 302"), 0) == 0
    # A flood: the answer holds ERA_OUTPUT_LIMIT per stream, flagged; the server reads the rest.
    limit = engine.settings["ERA_OUTPUT_LIMIT"]
    r = await _cmd(engine, sid, f"head -c {limit + 5 * 1024**2} /dev/zero | tr '\\0' x; echo done >&2", timeout=60)
    assert r["exit_code"] == 0 and r["truncated"] is True and len(r["stdout"]) == limit and r["stderr"] == "done\n"
    # A background flood keeps only its ring (1 MiB); a reader from 0 is told some was dropped.
    flood = await engine.commands.run(sid, {"cmd": "head -c 8000000 /dev/zero | tr '\\0' y", "shell": True,
                                            "background": True})
    process = await engine.commands.process(sid, flood["pid"])
    await asyncio.wait_for(process.done.wait(), 60)
    assert process.held <= 1024**2 + 64 * 1024
    page = await engine.commands.output(sid, flood["pid"], 0)
    assert page["dropped"] is True and page["events"][-1]["type"] == "exit"


async def test_bad_input_is_refused_naming_the_field(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    cases = [({"cmd": ["pwd"], "cwd": "../other"}, "cwd"), ({"cmd": ["pwd"], "cwd": "/etc"}, "cwd"),
             ({"cmd": ["pwd"], "cwd": "no/such/dir"}, "cwd"), ({"cmd": ["no-such-program-x"]}, "cmd"),
             ({"cmd": ["pwd"], "shell": True}, "cmd"), ({"cmd": []}, "cmd"), ({"cmd": ["a\0b"]}, "cmd"),
             ({"cmd": ["cat"], "stdin": "x" * (1024**2 + 1)}, "stdin"), ({"cmd": ["env"], "env": {"A=B": "1"}}, "env"),
             ({"cmd": ["true"], "timeout": -1}, "timeout")]
    for body, field in cases:
        with pytest.raises(BadRequest) as caught:
            await engine.commands.run(sid, body)
        assert caught.value.field == field, (body, caught.value.message)
    bg = await engine.commands.run(sid, {"cmd": ["sleep", "30"], "background": True})
    for name in ("SIGSYS", "9", "RTMIN", "kill -9"):
        with pytest.raises(BadRequest) as caught:
            await engine.commands.send_signal(sid, bg["pid"], {"signal": name})
        assert caught.value.field == "signal"
    with pytest.raises(BadRequest) as caught:
        await engine.commands.write_stdin(sid, bg["pid"], {"data": "x" * (1024**2 + 1)})
    assert caught.value.field == "data"
    for pid in ("999999", "abc", "-1"):
        with pytest.raises(NotFound):
            await engine.commands.output(sid, pid)
    with pytest.raises(NotFound):
        await engine.commands.run("no-such-session", {"cmd": ["true"]})


async def test_isolation_holds_for_commands(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    other = (await engine.create({"language": "python"}))["id"]
    await engine.write_file(other, "secret.txt", b"theirs")
    other_path = engine.files.path(await engine._record(other)).resolve()
    assert (engine.settings.data_dir / "era.db").is_file()  # there on the host: the probe can fail
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        probe = (f"import socket, os\n"
                 f"for target in [('127.0.0.1', {port}), ('169.254.169.254', 80)]:\n"
                 "    try:\n"
                 "        socket.create_connection(target, 2); print('connected')\n"
                 "    except OSError: print('refused')\n"
                 "try:\n"
                 "    socket.getaddrinfo('example.com', 80); print('dns')\n"
                 "except OSError: print('no dns')\n"
                 # another session's file; the server's store (its data directory is masked)
                 f"for path in [{str(other_path / 'secret.txt')!r}, {str(engine.settings.data_dir / 'era.db')!r}]:\n"
                 "    try:\n"
                 "        open(path, 'rb').read(); print('read')\n"
                 "    except OSError: print('denied')\n")
        r = await _cmd(engine, sid, ["python3", "-c", probe])
        assert r["stdout"].split() == ["refused", "refused", "no", "dns", "denied", "denied"], r
        r = await _cmd(engine, sid, "id -u; unshare -U true && echo unshared; mount -t tmpfs x /mnt 2>/dev/null "
                                    "&& echo mounted; touch /usr/x 2>/dev/null && echo wrote-root; echo end")
        assert r["stdout"].split() == [str(session_uid(await engine._record(sid))), "end"], r
        assert r["stdout"].split()[0] != "0"
    finally:
        server.close()


async def test_a_terminal_echoes_resizes_and_exits(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    seen: list[bytes] = []
    ended = asyncio.Event()

    def listener(event):
        if event["type"] == "raw":
            seen.append(event["data"])
        elif event["type"] == "exit":
            ended.set()

    async def until(predicate, timeout=15):
        for _ in range(int(timeout * 20)):
            if predicate(b"".join(seen)):
                return b"".join(seen)
            await asyncio.sleep(0.05)
        raise AssertionError(b"".join(seen)[-500:])

    process = await engine.commands.open_terminal(sid, 24, 80, listener)
    await engine.commands.terminal_input(sid, process, b"echo hi-$((40+2))\r")
    await until(lambda out: b"hi-42" in out)
    await engine.commands.terminal_resize(sid, process, 40, 120)
    await engine.commands.terminal_input(sid, process, b"stty size\r")
    await until(lambda out: b"40 120" in out)
    await engine.commands.terminal_input(sid, process, b"exit 7\r")
    await asyncio.wait_for(ended.wait(), 15)
    assert (process.state, process.exit_code) == ("exited", 7)


async def test_processes_end_with_the_session(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    record = await engine._record(sid)
    before = _sandbox_count("sleep 417")
    for _ in range(3):
        await engine.commands.run(sid, {"cmd": ["sleep", "417"], "background": True})
    assert await _settles_to(lambda: _sandbox_count("sleep 417"), before + 3) == before + 3
    containers = _containers(sid) if record.provisioner == "docker" else None
    assert containers is None or containers == 1  # every process in the kernel's container, none beside it
    process = (await engine.commands.list(sid))[0]
    await engine.delete(sid)
    assert await _settles_to(lambda: _sandbox_count("sleep 417"), before) == before
    assert record.provisioner != "docker" or await _settles_to(lambda: _containers(sid), 0) == 0
    with pytest.raises(NotFound):
        await engine.commands.list(sid)
    assert process["state"] == "running"  # what it was; the record went with the session


async def test_a_kernel_restart_ends_background_processes_and_says_why(engine):
    sid = (await engine.create({"language": "python"}))["id"]
    bg = await engine.commands.run(sid, {"cmd": ["sleep", "418"], "background": True})
    process = await engine.commands.process(sid, bg["pid"])
    await engine.stop_kernel(sid)
    await asyncio.wait_for(process.done.wait(), 15)
    assert process.state == "killed" and "kernel stopped" in process.reason
    assert await _settles_to(lambda: _sandbox_count("sleep 418"), 0) == 0
    r = await _cmd(engine, sid, ["echo", "again"])  # a new kernel, a new supervisor
    assert r["stdout"] == "again\n"


async def test_background_processes_outlive_their_server_in_the_record(era_settings):
    """A restarted server still lists the background processes of the one before, says
    how each ended (one exited, one went with the server), and serves their output from
    the journal; an ended one refuses stdin and signals (409)."""
    from era_kernel.engine.manager import SessionManager

    first = SessionManager(era_settings)
    await first.start()
    try:
        sid = (await first.create({"language": "python"}))["id"]
        done = await _cmd(first, sid, "echo finished; echo oops >&2; exit 4", background=True)
        await asyncio.wait_for((await first.commands.process(sid, done["pid"])).done.wait(), 15)
        long = await _cmd(first, sid, "for i in 1 2 3; do echo line-$i; done; sleep 419", background=True)
        page = await first.commands.output(sid, long["pid"], 0, wait=5)
        while "line-3" not in "".join(e.get("content", "") for e in page["events"]):
            page = await first.commands.output(sid, long["pid"], 0, wait=5)
    finally:
        await first.shutdown()
    assert await _settles_to(lambda: _sandbox_count("sleep 419"), 0) == 0
    second = SessionManager(era_settings)
    await second.start()
    try:
        listed = {p["pid"]: p for p in await second.commands.list(sid)}
        assert (listed[done["pid"]]["state"], listed[done["pid"]]["exit_code"]) == ("exited", 4), listed
        assert listed[long["pid"]]["state"] == "killed", listed
        out = await second.commands.output(sid, done["pid"], 0)
        text = {s: "".join(e["content"] for e in out["events"] if e["type"] == s) for s in ("stdout", "stderr")}
        assert text == {"stdout": "finished\n", "stderr": "oops\n"}, out
        assert out["events"][-1]["type"] == "exit" and out["exit_code"] == 4
        out = await second.commands.output(sid, long["pid"], 0)
        assert "".join(e.get("content", "") for e in out["events"]) == "line-1\nline-2\nline-3\n", out
        # after= pages as before the restart
        tail = await second.commands.output(sid, long["pid"], out["events"][0]["seq"])
        assert tail["events"] == out["events"][1:]
        with pytest.raises(Conflict):
            await second.commands.send_signal(sid, long["pid"], {"signal": "TERM"})
        events = [e["type"] for e in await second.session_events(sid)]
        assert events.count("process_started") == 2 and events.count("process_ended") == 2, events
    finally:
        await second.shutdown()


def _containers(sid: str) -> int:
    from era_kernel.provisioning.docker import shared_docker_client

    return len(shared_docker_client().containers.list(all=True, filters={"label": f"era.session={sid}"}))


async def test_a_persistent_sessions_command_files_reach_the_workspace_store(engine):
    sid = (await engine.create({"language": "python", "persistent": True}))["id"]
    await _cmd(engine, sid, "mkdir -p out && echo built > out/artifact.txt")
    stored = {f["path"] for f in await engine.files.store.list(sid)}
    assert "out/artifact.txt" in stored, stored
    bg = await engine.commands.run(sid, {"cmd": "echo later > later.txt", "shell": True, "background": True})
    process = await engine.commands.process(sid, bg["pid"])
    await asyncio.wait_for(process.done.wait(), 15)
    for _ in range(50):
        if "later.txt" in {f["path"] for f in await engine.files.store.list(sid)}:
            break
        await asyncio.sleep(0.1)
    assert "later.txt" in {f["path"] for f in await engine.files.store.list(sid)}


async def test_processes_share_the_kernels_cgroup(engine):
    """One memory and pids budget: a command's processes are in the kernel's own cgroup
    (its container's, on Docker), not in one beside it."""
    from pathlib import Path

    sid = (await engine.create({"language": "python"}))["id"]
    await engine.commands.run(sid, {"cmd": ["sleep", "421"], "background": True})
    provisioner = engine.table.kernel(sid).km.provisioner
    if (await engine._record(sid)).provisioner == "docker":
        kernel_pid = provisioner.client.api.inspect_container(provisioner.container_id)["State"]["Pid"]
    else:
        kernel_pid = await asyncio.to_thread(provisioner._kernel_pid)
    (pid,) = kernel_processes("sleep 421")
    groups = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().split()}
    kernel = {line.split(":", 2)[1]: line.split(":", 2)[2]
              for line in Path(f"/proc/{kernel_pid}/cgroup").read_text().split()}
    memory = next(key for key in groups if "memory" in key.split(",") or key == "")
    assert groups[memory] == kernel[memory] and groups[memory] not in ("/", ""), (groups, kernel)


async def test_the_bash_kernel_and_a_command_see_one_environment(engine):
    sid = (await engine.create({"language": "bash", "env": {"FROM_SESSION": "b"}}))["id"]
    kernel = await engine.run(sid, {"code": "env", "timeout": 60})
    assert kernel["exit_code"] == 0, kernel
    command = await _cmd(engine, sid, ["env"])

    def parsed(text):
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    k, c = parsed(kernel["stdout"]), parsed(command["stdout"])
    for key in ("PATH", "HOME", "ERA_SESSION", "ERA_SESSION_ID", "ERA_LANGUAGE", "FROM_SESSION"):
        assert k.get(key) == c.get(key) and c.get(key), (key, k.get(key), c.get(key))


async def test_a_kernel_that_rewrites_its_environment_gains_nothing_as_root(engine):
    """(Both provisioners; the danger is local.) The supervisor of a local session is started by root steps (nsenter, setpriv) that
    join the kernel's namespaces. The kernel's code can rewrite what /proc/<pid>/environ
    shows (it is its own memory); were that environment used for those steps, a PATH
    naming the session's files would have root run the session's own `setpriv`. Here the
    kernel does exactly that before its first command, and the command still runs as the
    session's uid while the planted program never runs."""
    sid = (await engine.create({"language": "python"}))["id"]
    record = await engine._record(sid)
    plant = r'''
import os
# In the workspace: locally it has the same path on the host and in the sandbox.
planted = os.path.join(os.getcwd(), "evil")
os.makedirs(planted, exist_ok=True)
for name in ("setpriv", "nsenter", "python3", "env", "sh"):
    path = os.path.join(planted, name)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nid -u > {planted}/ran-as\nexec /usr/bin/{name} \"$@\"\n")
    os.chmod(path, 0o755)
fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
start, end = int(fields[47]), int(fields[48])  # env_start, env_end (fields 50, 51)
with open("/proc/self/mem", "r+b") as mem:
    mem.seek(start)
    block = mem.read(end - start)
    # The real PATH renamed, and every other variable's room given to one PATH that
    # names the plant (the kernel's path can be longer than any single variable).
    entries = block.split(b"\0")
    real = next(e for e in entries if e.startswith(b"PATH="))
    head = b"X" + real[1:] + b"\0"
    new = b"PATH=" + planted.encode() + b":"
    room = len(block) - len(head) - len(new) - 1
    assert room >= 0, f"the environment is too small to hold {new!r}"
    block = head + new + b"/x" * (room // 2) + b"/" * (room % 2) + b"\0"
    mem.seek(start)
    mem.write(block)
print(dict(e.split(b"=", 1) for e in open("/proc/self/environ", "rb").read().split(b"\0") if b"=" in e)[b"PATH"].decode())
'''
    planted = await engine.run(sid, {"code": plant})
    assert planted["exit_code"] == 0 and "/evil:" in planted["stdout"], (planted["error"], planted["stderr"])
    ran_as = engine.files.path(record) / "evil" / "ran-as"  # in the session's workspace, on the host
    try:
        # Absolute paths: the command itself inherits the PATH the session gave itself.
        r = await _cmd(engine, sid, ["/bin/sh", "-c", "/usr/bin/id -u; /bin/ls evil"])
    finally:
        assert not ran_as.exists(), f"a program the session planted ran as uid {ran_as.read_text().strip()}"
    assert r["exit_code"] == 0, r
    assert r["stdout"].split("\n")[0] == str(session_uid(record)), r
