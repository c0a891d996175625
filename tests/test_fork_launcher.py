"""The fork launcher (ERA_LOCAL_LAUNCHER=fork) as a server's user meets it: sessions (a
pooled kernel and launched ones) run in forked kernels with their environment; a run's
timeout, an interrupt, a restart and a kernel that exits behave as with bubblewrap. The
provisioner-level promises (isolation, limits, clean-up) are the conformance suite's
``era-local-fork`` backend (tests/conformance/provisioners.py)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from era_kernel.resources import read_pss_bytes
from tests.support.era_server import ServerProcess

ENV = {"ERA_LOCAL_LAUNCHER": "fork", "ERA_POOL_SIZE": "1", "ERA_INTERRUPT_GRACE": "5"}

# Where the kernel runs: under bubblewrap its pid 1 is bwrap; forked, the sandbox's own init.
PROBE = ("import json, os, era_storage\nprint(json.dumps({'init': open('/proc/1/cmdline', 'rb').read().split(b'\\0')[0]"
         ".decode(), 'uid': os.getuid(), 'greeting': os.environ.get('GREETING'), 'cwd': os.getcwd(), "
         "'pid': os.getpid()}))")  # era_storage: every kernel has the SDK, forked ones too


@pytest.fixture(scope="module")
def server():
    if os.getuid() != 0:
        pytest.skip("the fork launcher needs root")
    srv = ServerProcess(env=ENV).start()
    yield srv
    srv.cleanup()


def probe(server, sid: str) -> dict:
    answer = server.json("POST", f"/api/sessions/{sid}/run", {"code": PROBE})
    assert answer.get("stdout"), answer
    return json.loads(answer["stdout"])


def test_sessions_run_in_forked_kernels_with_their_environment(server):
    server.json("POST", "/api/sessions", {"id": "fk-pooled"}, expect=201)  # takes the pooled kernel
    server.json("POST", "/api/sessions", {"id": "fk-env", "env": {"GREETING": "hello"}}, expect=201)
    for sid, greeting in (("fk-pooled", None), ("fk-env", "hello")):
        found = probe(server, sid)
        assert found["init"] == "era-fork-init", found
        assert found["uid"] != 0 and found["greeting"] == greeting and found["pid"] == 2, found
    assert any("zygote" in line for line in server.lines), "the server never started a zygote"
    assert not [line for line in server.lines if "rehearsing a kernel's start failed" in line]
    # On the host, ps (and the orphan reaper, and every search by command line) tells each
    # forked kernel by its own command line, naming its connection file, and its init apart.
    # Every kernel has its init; an init may be ahead of its kernel, or a moment behind it
    # (the pool refilling meanwhile: a starting kernel names itself just before its init,
    # which renames itself once it has joined the kernel's namespaces).
    deadline = time.monotonic() + 10
    while True:
        argvs = {}
        for pid in server.descendants():
            try:
                argvs[pid] = (open(f"/proc/{pid}/cmdline", "rb").read().decode().rstrip("\0").split("\0"),
                              open(f"/proc/{pid}/comm").read().strip())
            except OSError:
                continue
        kernels = [a for a, _ in argvs.values() if "ipykernel_launcher" in a and a[a.index("-f") + 1].endswith(
            "/connection.json")]
        inits = [a for a, comm in argvs.values()
                 if a[0] == comm == "era-fork-init" and a[2].endswith("/connection.json")]
        if len(kernels) >= 2 and {k[k.index("-f") + 1] for k in kernels} <= {i[2] for i in inits}:
            break
        assert time.monotonic() < deadline, argvs
        time.sleep(0.05)


def test_the_sandboxs_init_is_as_isolated_as_its_kernel(server):
    """The kernel builds the sandbox and init joins it (forked.py): init must end in the
    same namespaces and cgroup as its kernel, with the same uid, no capabilities,
    no_new_privs and the seccomp filter, never left root on the host's mounts."""
    server.json("POST", "/api/sessions", {"id": "fk-init"}, expect=201)
    probe(server, "fk-init")

    def status(pid: int) -> dict[str, str]:
        fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status") if ":" in line)
        return {k: fields[k].split() for k in ("Uid", "Gid", "CapEff", "CapPrm", "CapBnd", "NoNewPrivs", "Seccomp")}

    pairs = []
    for pid in server.descendants():
        try:
            if open(f"/proc/{pid}/comm").read().strip() != "era-fork-init":
                continue
            kernels = open(f"/proc/{pid}/task/{pid}/children").read().split()
        except OSError:
            continue
        if kernels:
            pairs.append((pid, int(kernels[0])))
    assert pairs, "no forked kernel with its init"
    for init, kernel in pairs:
        for ns in ("mnt", "net", "ipc", "uts", "cgroup", "pid_for_children"):
            assert os.readlink(f"/proc/{init}/ns/{ns}") == os.readlink(f"/proc/{kernel}/ns/{ns}"), (ns, init, kernel)
        assert os.readlink(f"/proc/{init}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert open(f"/proc/{init}/cgroup").read() == open(f"/proc/{kernel}/cgroup").read()
        theirs, its = status(init), status(kernel)
        assert theirs == its, (theirs, its)
        assert its["Uid"][0] != "0" and set(its["CapEff"] + its["CapBnd"]) == {"0000000000000000"}, its
        assert its["NoNewPrivs"] == ["1"] and its["Seccomp"] == ["2"], its
        # init is its own small program (fork_init.c), not a copy of the zygote's Python.
        assert os.readlink(f"/proc/{init}/exe") == os.path.realpath(require_init_program())
        assert read_pss_bytes(init) < 1024**2, read_pss_bytes(init)


def require_init_program() -> str:
    from era_kernel.provisioning.forked import INIT_PROGRAM

    if not os.access(INIT_PROGRAM, os.X_OK):
        if os.environ.get("ERA_REQUIRE_SANDBOX"):
            pytest.fail(f"{INIT_PROGRAM} is missing: scripts/setup.sh builds it")
        pytest.skip(f"{INIT_PROGRAM} is missing (scripts/setup.sh builds it)")
    return INIT_PROGRAM


def handles(pid: int, signum: int) -> bool:
    """Has ``pid`` a handler for ``signum`` (its SigCgt mask)?"""
    with open(f"/proc/{pid}/status") as fh:
        caught = next(int(line.split()[1], 16) for line in fh if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signum - 1)))


@pytest.mark.parametrize("init", ["program", "python"])
def test_the_sandboxs_init_passes_signals_on_and_exits_with_its_kernels_status(init):
    """init as the sandbox runs it, outside a sandbox: its own program (fork_init.c), or,
    when that cannot be exec'd, the zygote's Python (forked._init). A termination signal
    reaches the kernel; init ends with the kernel's status."""
    from era_kernel.provisioning import forked

    if init == "program":
        require_init_program()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # init
        try:
            os.close(ready_r)
            kernel = os.fork()
            if kernel == 0:  # the kernel: ends with status 7 on SIGTERM
                signal.signal(signal.SIGTERM, lambda *_: os._exit(7))
                os.write(ready_w, b"k")
                while True:
                    signal.pause()
            os.close(ready_w)
            program = forked._open_init_program() if init == "program" else os.open("/dev/null", os.O_RDONLY)
            forked._exec_init(program, kernel, ["-f", "/k/connection.json"])
            os._exit(forked._init(kernel))  # /dev/null did not exec: init stays Python
        except BaseException:  # noqa: BLE001
            os._exit(99)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"k"
        deadline = time.monotonic() + 10
        while not handles(pid, signal.SIGTERM):  # before that, SIGTERM would end init itself
            assert time.monotonic() < deadline, "init never set its handler"
            time.sleep(0.01)
        if init == "program":
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                assert fh.read().split(b"\0")[:3] == [b"era-fork-init", b"-f", b"/k/connection.json"]
            with open(f"/proc/{pid}/comm") as fh:
                assert fh.read().strip() == "era-fork-init"
        os.kill(pid, signal.SIGTERM)
    finally:
        os.close(ready_r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 7


IMMORTALITY = ("import gc, json, sys, weakref\n"
               "class Mine: pass\n"
               "mine, freed = Mine(), []\n"
               "weakref.finalize(mine, freed.append, 'mine')\n"
               "del mine; gc.collect()\n"
               "print(json.dumps({'zygote': sys.getrefcount(json.dumps), 'own': sys.getrefcount(Mine), "
               "'freed': freed}))")


def test_the_zygotes_objects_are_immortal_in_a_kernel_and_its_own_are_freed(server):
    """On CPython 3.12 and 3.13 the zygote makes what it holds immortal before it forks
    (prepared.immortalize_heap), so a kernel reading it leaves its pages shared; what a
    kernel makes itself is counted and freed as ever. Elsewhere counts are untouched."""
    from era_kernel.provisioning.prepared import immortalisable

    server.json("POST", "/api/sessions", {"id": "fk-immortal"}, expect=201)
    answer = server.json("POST", "/api/sessions/fk-immortal/run", {"code": IMMORTALITY})
    found = json.loads(answer["stdout"])
    assert found["freed"] == ["mine"] and found["own"] < 100, found
    if immortalisable():  # json.dumps: imported by the zygote, read by every kernel
        assert found["zygote"] >= 0xFFFFFFFF, found
    else:
        assert found["zygote"] < 1000, found


def test_timeout_interrupt_and_restart(server):
    sid = "fk-control"
    server.json("POST", "/api/sessions", {"id": sid}, expect=201)
    server.json("POST", f"/api/sessions/{sid}/run", {"code": "kept = 41"})
    started = time.monotonic()
    timed_out = server.json("POST", f"/api/sessions/{sid}/run",
                            {"code": "import time\ntime.sleep(60)", "timeout": 1}, expect=None)
    assert time.monotonic() - started < 15, "the run's timeout did not stop it"
    assert "KeyboardInterrupt" in json.dumps(timed_out) or "timeout" in json.dumps(timed_out).lower(), timed_out
    assert server.json("POST", f"/api/sessions/{sid}/run", {"code": "print(kept + 1)"})["stdout"] == "42\n"
    server.json("POST", f"/api/sessions/{sid}/restart", expect=None)
    after = server.json("POST", f"/api/sessions/{sid}/run", {"code": "print('kept' in dir())"})
    assert after["stdout"] == "False\n", after
    assert not probe(server, sid)["init"].endswith("bwrap")


def test_a_kernel_that_exits_is_reported_with_its_status_and_replaced(server):
    sid = "fk-exit"
    server.json("POST", "/api/sessions", {"id": sid}, expect=201)
    server.json("POST", f"/api/sessions/{sid}/run", {"code": "import os; os._exit(3)"}, expect=None)
    deadline = time.monotonic() + 20
    while True:
        events = server.json("GET", f"/api/sessions/{sid}/events")["events"]
        died = [e for e in events if e["type"] == "kernel_died"]
        if died or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert died and died[-1].get("exit_status") == 3, events
    assert server.json("POST", f"/api/sessions/{sid}/run", {"code": "print('again')"})["stdout"] == "again\n"


def test_the_command_line_parsed_in_the_zygote_configures_a_kernel_as_its_own_parse_would():
    from ipykernel.kernelapp import IPKernelApp

    from era_kernel.languages import PYTHON_KERNEL_FIXES, PYTHON_KERNEL_TUNING
    from era_kernel.provisioning import prepared

    tail = [*PYTHON_KERNEL_TUNING, *PYTHON_KERNEL_FIXES]
    prepared.prepare_command_line(tail)
    argv = ["-f", "/run/era/k1/connection.json", *tail]
    usual, shortcut = IPKernelApp(), IPKernelApp()
    usual.parse_command_line(argv)
    assert prepared.use_parsed_command_line(shortcut, argv)
    shortcut.parse_command_line(argv)
    assert shortcut.connection_file == usual.connection_file == "/run/era/k1/connection.json"
    assert repr(shortcut.config) == repr(usual.config) and repr(shortcut.cli_config) == repr(usual.cli_config)
    assert (shortcut.argv, shortcut.extra_args) == (usual.argv, usual.extra_args) == (argv, [])
    assert shortcut.exec_lines == usual.exec_lines and shortcut.exec_lines, "the protocol fixes' cell"
    # Each kernel its own copy: one kernel's configuration never reaches the next.
    other = IPKernelApp()
    assert prepared.use_parsed_command_line(other, ["-f", "/run/era/k2/connection.json", *tail])
    other.parse_command_line(["-f", "/run/era/k2/connection.json", *tail])
    assert other.connection_file.endswith("k2/connection.json") and shortcut.connection_file.endswith("k1/connection.json")
    # Another command line is parsed as usual.
    assert not prepared.use_parsed_command_line(IPKernelApp(), ["-f", "/run/era/k3/connection.json", "--debug"])


def test_a_forked_kernels_end_is_seen_past_a_thousand_descriptors():
    """The server holds over FD_SETSIZE descriptors with some 60 forked kernels: waiting on
    a kernel's pidfd must not use select(), which refuses descriptors numbered past 1024
    (it did, and /api/resources/stats answered 500)."""
    import resource

    from era_kernel.provisioning.zygote import _readable

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        r, w = os.pipe()
        assert r > 1024
        assert _readable(r, 0) is False
        os.write(w, b"x")
        assert _readable(r, 0.5) is True
        os.close(r), os.close(w)
    finally:
        for fd in held:
            os.close(fd)


def test_the_module_list_taken_in_the_zygote_is_what_ipykernel_would_list():
    """ipykernel lists the kernel's module files (its debugger steps over them) by reading
    every module; a forked kernel gets the zygote's list instead, plus what it imported
    since (prepared.list_modules_as_prepared). The two lists must hold the same files."""
    import sys

    import ipykernel.ipkernel

    from era_kernel.provisioning import prepared

    def as_ipykernel_lists(modules) -> list[str]:  # IPythonKernel.__init__, word for word
        return [m.__file__ for m in modules.copy().values() if hasattr(m, "__file__") and m.__file__]

    prepared.prepare_module_files()
    try:
        import mailbox  # noqa: F401 - imported "after the fork"
        reloaded = sys.modules.pop("colorsys", None)
        import colorsys  # noqa: F401 - removed and imported again: now at the end
        with prepared.list_modules_as_prepared():
            assert ipykernel.ipkernel.sys is not sys
            listed = as_ipykernel_lists(ipykernel.ipkernel.sys.modules)
        assert ipykernel.ipkernel.sys is sys
        assert sorted(set(listed)) == sorted(set(as_ipykernel_lists(sys.modules)))
        assert any(path.endswith("mailbox.py") for path in listed)
    finally:
        prepared.PREPARED.pop("modules", None)
        if reloaded is not None:
            sys.modules["colorsys"] = reloaded


REHEARSAL_PROBE = """
import builtins, gc, json, os, signal, sys, threading
from era_kernel.provisioning import prepared, zygote

def state():
    return {"fds": sorted(os.listdir("/proc/self/fd")), "threads": threading.active_count(), "path": sys.path,
            "environ": dict(os.environ), "cwd": os.getcwd(), "builtins": sorted(builtins.__dict__),
            "signals": {s: repr(signal.getsignal(s)) for s in signal.valid_signals() if signal.getsignal(s) is not None},
            "std": [repr(getattr(sys, n)) for n in ("stdin", "stdout", "stderr", "displayhook", "excepthook")],
            "main": repr(sys.modules["__main__"])}

zygote._preload()
before = state()
zygote._warm_up()
after = state()
from ipykernel.kernelapp import IPKernelApp
from IPython.core.interactiveshell import InteractiveShell
print(json.dumps({"changed": {k: [before[k], after[k]] for k in before if before[k] != after[k]},
                  "rehearsals": prepared.PREPARED.get("rehearsals"),
                  "left": [type(o).__name__ for o in gc.get_objects() if isinstance(o, (IPKernelApp, InteractiveShell))]}))
"""


def test_a_rehearsed_kernel_start_leaves_the_zygote_as_it_was(tmp_path):
    """The zygote runs ipykernel's whole start for a throw-away kernel (prepared.
    rehearse_kernel_start) so its code is warm in the pages every kernel shares; after
    it, the zygote must hold no thread, descriptor or kernel object of it and have its
    own streams, signals, environment, paths and builtins back: every kernel inherits them."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", REHEARSAL_PROBE], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"PATH": os.environ["PATH"], "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"changed": {}, "rehearsals": 2, "left": []}, found
    assert "rehearsing" not in done.stderr and "Task was destroyed" not in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []  # its directories went with it


def test_era_doctor_warns_when_the_sandboxs_init_program_is_missing(era_settings, monkeypatch):
    """Without fork_init.c built (scripts/setup.sh), each forked kernel's init stays a
    copy of the zygote's Python: it works, but costs about 4 MiB a kernel, so doctor says so."""
    from era_kernel.doctor import _launcher
    from era_kernel.provisioning import forked, prepared

    if os.getuid() != 0:
        pytest.skip("the fork launcher needs root")
    fork = era_settings.replace(ERA_LOCAL_LAUNCHER="fork")
    if os.access(forked.INIT_PROGRAM, os.X_OK) and prepared.immortalisable():
        assert _launcher(fork)[1] == "OK"
    monkeypatch.setattr(forked, "INIT_PROGRAM", "/nonexistent/era-fork-init")
    name, status, detail = _launcher(fork)
    assert (name, status) == ("launcher", "WARN") and "/nonexistent/era-fork-init is missing" in detail
    assert "scripts/setup.sh" in detail
    monkeypatch.setattr(prepared, "immortalisable", lambda: False)
    name, status, detail = _launcher(fork)
    assert status == "WARN" and "cannot make its objects immortal" in detail and "ERA_PYTHON=python3.13" in detail
