"""EraProvisioner conformance, isolation: what a kernel can reach and what reaches it
(filesystem, privileges, network, environment), and the launch options it refuses: what
every ERA provisioner promises, checked on each entry of ``PROVISIONERS``
(tests/conformance/provisioners.py says how kernels are started and shared).
docs/security.md cases checked here: 17-19, 21 and the finding "Servers sharing a
runtime directory"."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

import pytest

from era_kernel.errors import BadRequest
from era_kernel.kernel.wire import EraKernelManager
from era_kernel.provisioning.base import EraProvisioner, LaunchOptions
from era_kernel.provisioning.ipc import read_pid_record
from era_kernel.provisioning.owner import start_time


from .provisioners import FAKE_SECRETS, ODD_VALUES, Kernel, kernel, new_uid, server_secrets

pytestmark = pytest.mark.asyncio(loop_scope="module")  # the shared kernel lives on the module's loop


# ---------------------------------------------------------------------------- what it is


async def test_it_is_an_era_provisioner_found_by_its_entry_point(backend, shared):
    provisioner = shared.kernel.provisioner
    assert isinstance(provisioner, EraProvisioner)
    from jupyter_client.provisioning import KernelProvisionerFactory

    assert backend.entry_point in KernelProvisionerFactory.instance().get_provisioner_entries()
    assert provisioner.oom_kills() in (0, None) and provisioner.oom_killed is False  # nothing was killed


async def test_kernel_answers_over_ipc_and_opens_no_tcp_port(shared):
    k = shared.kernel
    info = k.km.get_connection_info()
    assert info["transport"] == "ipc" and Path(info["ip"]).parent == k.kernel_dir
    sockets = sorted(p.name for p in k.kernel_dir.iterdir() if p.is_socket())
    assert sockets == [f"kernel-{n}" for n in range(1, 6)], sockets
    probe = r"""
import json, os
inodes = set()
for fd in os.listdir('/proc/self/fd'):
    try:
        target = os.readlink(f'/proc/self/fd/{fd}')
    except OSError:
        continue
    if target.startswith('socket:['):
        inodes.add(target[8:-1])
tcp = []
for name in ('tcp', 'tcp6'):
    try:
        lines = open(f'/proc/net/{name}').read().splitlines()[1:]
    except OSError:
        continue
    tcp += [l.split() for l in lines if l.split()[9] in inodes]
unix = [l.split()[7] for l in open('/proc/net/unix').read().splitlines()[1:] if len(l.split()) > 7 and l.split()[6] in inodes]
print(json.dumps({'tcp': tcp, 'unix': unix}))
"""
    found = await k.json(probe)
    assert {f"{k.kernel_dir}/kernel-{n}" for n in range(1, 6)} <= set(found["unix"]), found["unix"]
    # ipykernel's own pipe for output of forked processes listens on the loopback of the
    # kernel's network namespace; nothing else of the kernel is TCP.
    local_addresses = {line[1].split(":")[0] for line in found["tcp"]}
    assert local_addresses <= {"0100007F"}, found["tcp"]


async def test_owner_record_beside_the_kernel_directory(backend, shared):
    """docs/security.md, finding "Servers sharing a runtime directory": the reaper of
    another server judges the directory by this record."""
    k = shared.kernel
    record = read_pid_record(k.kernel_dir)
    assert record is not None, "no owner record"
    assert (record.owner, record.owner_start) == (os.getpid(), start_time(os.getpid()))
    assert record.pid == 0 or record.pid in {pid for pid, _ in backend.processes(k)}, record


# ---------------------------------------------------------------------------- filesystem


async def test_workspace_is_the_writable_working_directory_the_rest_read_only(backend, shared):
    k = shared.kernel
    code = r"""
import json, os
out = {'cwd': os.getcwd()}
open('made-inside.txt', 'w').write('hi')
for path in ('/usr/era-probe', '/etc/era-probe', '/era-probe'):
    try:
        open(path, 'w'); out[path] = 'writable'
    except OSError as e:
        out[path] = e.errno
out['root'] = [l.split()[3].split(',')[0] for l in open('/proc/mounts') if l.split()[1] == '/']
print(json.dumps(out))
"""
    found = await k.json(code)
    assert found.pop("cwd") == backend.workspace_seen(k.workspace)
    root = found.pop("root")
    assert found == {p: backend.read_only_errno for p in found}, found
    if backend.read_only_errno != errno.EROFS:  # the permission check came first: the mount must say it too
        assert root[-1:] == ["ro"], root
    made = k.workspace / "made-inside.txt"
    assert made.read_text() == "hi" and made.stat().st_uid == k.uid


async def test_readonly_directories_are_readable_not_writable(backend, shared):
    code = f"""
import json, sys
sys.path.insert(0, {str(shared.readonly)!r})
import mod
try:
    open({str(shared.readonly / 'new.py')!r}, 'w'); wrote = 'writable'
except OSError as e:
    wrote = e.errno
mount = [l.split()[3].split(',')[0] for l in open('/proc/mounts') if l.split()[1] == {str(shared.readonly)!r}]
print(json.dumps([mod.VALUE, wrote, mount]))
"""
    value, wrote, mount = await shared.kernel.json(code)
    assert [value, wrote] == ["from the package directory", backend.read_only_errno]
    if backend.read_only_errno != errno.EROFS:  # the permission check came first: the mount must say it too
        assert mount[-1:] == ["ro"], mount
    assert not (shared.readonly / "new.py").exists()


async def test_host_files_and_other_kernels_are_invisible(backend, shared):
    """docs/security.md case 21: another session's files and sockets, the server's data,
    the host's secrets: none of them exist for a kernel, except its own IPC directory."""
    p = shared.place
    secret = p.root / "outside" / "secret.txt"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("host secret")
    secret.chmod(0o644)
    async with kernel(p) as other:
        (other.workspace / "b-private.txt").write_text("b's data")
        paths = [str(secret), str(other.workspace / "b-private.txt"), str(other.kernel_dir / "connection.json"),
                 str(p.settings.data_dir / "era.db"), "/etc/shadow", "/root/.bashrc"]
        code = f"""
import json, os
seen = {{}}
for p in {paths!r}:
    try:
        seen[p] = open(p).read()[:40]
    except OSError as e:
        seen[p] = type(e).__name__
k = {str(p.runtime_dir / 'k')!r}
seen['k'] = sorted(os.listdir(k)) if os.path.isdir(k) else []
seen['uid'] = os.getuid()
print(json.dumps(seen))
"""
        seen = await shared.kernel.json(code)
    assert seen.pop("uid") not in (0, None)
    assert seen.pop("k") == [shared.kernel.kernel_dir.name], "only its own IPC directory"
    assert seen.pop("/etc/shadow") in ("PermissionError", "FileNotFoundError")
    assert seen.pop("/root/.bashrc") in ("PermissionError", "FileNotFoundError")
    assert seen == {path: "FileNotFoundError" for path in seen}, seen


# ---------------------------------------------------------------------------- privileges

PROBE_PROCESSES = r"""
import json, os
procs = {}
for pid in os.listdir('/proc'):
    if pid.isdigit():
        try:
            status = dict(l.split(':', 1) for l in open(f'/proc/{pid}/status').read().splitlines() if ':' in l)
        except OSError:
            continue
        procs[pid] = {k: status[k].strip() for k in ('Name', 'Uid', 'Gid', 'NoNewPrivs', 'CapEff', 'CapPrm', 'CapBnd')
                      if k in status}
import ctypes, subprocess
# gVisor's /proc/<pid>/status has no NoNewPrivs line: ask the kernel for our own (children
# inherit it across fork and exec).
no_new_privs = ctypes.CDLL(None, use_errno=True).prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
tools = {t: subprocess.run(argv, capture_output=True).returncode for t, argv in
         {'mount': ['mount', '-t', 'tmpfs', 'x', '/mnt'], 'unshare': ['unshare', '--user', '--map-root-user', 'true'],
          'sudo_su': ['su', '-c', 'true']}.items()}
print(json.dumps({'procs': procs, 'uid': os.getuid(), 'gid': os.getgid(), 'euid': os.geteuid(),
                  'self': str(os.getpid()), 'tools': tools, 'no_new_privs': no_new_privs}))
"""


async def test_runs_as_the_given_uid_with_no_privileges(shared):
    """docs/security.md case 18: the session's uid, no capabilities, no_new_privs, for the
    kernel and everything it starts; set-uid tools and namespaces give nothing back."""
    k = shared.kernel
    await k.run("import subprocess; _bg = subprocess.Popen(['sleep', '30'])")  # a child process counts too
    try:
        probe = await k.json(PROBE_PROCESSES)
    finally:
        await k.run("_bg.kill(); _bg.wait()")
    assert probe["uid"] == probe["euid"] == k.uid and probe["uid"] != 0
    assert probe["gid"] == (k.uid if os.getuid() == 0 else os.getgid())
    assert all(code != 0 for code in probe["tools"].values()), probe["tools"]
    ours = {pid: s for pid, s in probe["procs"].items() if s["Uid"].split() == [str(k.uid)] * 4}
    assert probe["self"] in ours and "sleep" in {s["Name"] for s in ours.values()}, probe["procs"]
    assert probe["no_new_privs"] == 1
    for pid, status in probe["procs"].items():
        assert status.get("NoNewPrivs", "1") == "1", (pid, status)
        assert status["CapEff"] == "0000000000000000", (pid, status)
        assert status["CapPrm"] == "0000000000000000", (pid, status)
        if status["Name"] not in k.backend.root_helpers:
            assert all(u != "0" for u in status["Uid"].split()), (pid, status)


# ---------------------------------------------------------------------------- network


@pytest.fixture
def host_listener():
    """A TCP service on the host's loopback, as the ERA server or a database would be."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


NETWORK_PROBE = """
import json, socket
results = {{}}
for name, addr in {{'host_loopback': ('127.0.0.1', {port}), 'metadata': ('169.254.169.254', 80),
                    'public': ('1.1.1.1', 53)}}.items():
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect(addr); results[name] = 'connected'
    except OSError as e:
        results[name] = type(e).__name__
    finally:
        s.close()
try:
    socket.getaddrinfo('example.com', 80); results['dns'] = 'resolved'
except OSError as e:
    results['dns'] = type(e).__name__
results['interfaces'] = sorted(n for _, n in socket.if_nameindex())
print(json.dumps(results))
"""


async def test_no_network_by_default(shared, host_listener):
    """docs/security.md case 19: nothing but loopback, no DNS, and the host's services
    unreachable."""
    results = await shared.kernel.json(NETWORK_PROBE.format(port=host_listener.getsockname()[1]))
    assert "connected" not in results.values() and results["dns"] != "resolved", results
    assert results["interfaces"] == ["lo"]
    with pytest.raises(BlockingIOError):
        host_listener.accept()  # nothing reached the host's service


async def test_allow_network_gives_a_network(place):
    """Only the interfaces are checked: where the traffic may go (an egress network that
    drops the host's addresses, or the host's own) is the provisioner's configuration."""
    async with kernel(place, allow_network=True) as k:
        interfaces = await k.json("import json, socket; print(json.dumps(sorted(n for _, n in socket.if_nameindex())))")
    assert set(interfaces) - {"lo"}, interfaces


# ---------------------------------------------------------------------------- environment


async def test_kernel_env_holds_only_what_we_pass(shared):
    """docs/security.md cases 21 and 17: the session's env reaches the kernel verbatim
    (nothing runs it through a shell); the server's own environment does not."""
    env = await shared.kernel.json("import os, json; print(json.dumps(dict(os.environ)))")
    assert not any(k.startswith(("AWS_", "ERA_")) for k in env), sorted(env)
    assert not set(FAKE_SECRETS.values()) & set(env.values())
    assert env["GREETING"] == "hello"
    for key, value in ODD_VALUES.items():
        assert env[key] == value
    exists = await shared.kernel.json("import os, json; print(json.dumps([os.path.exists('/tmp/pwned'), "
                                      "os.path.exists('/tmp/pwned2')]))")
    assert exists == [False, False] and not os.path.exists("/tmp/pwned")


async def test_plain_jupyter_launch(backend, place, monkeypatch):
    """No ``era`` options (a plain Jupyter application: a working directory and its own
    environment): settings from the process environment, the secrets in it kept out."""
    monkeypatch.setenv("ERA_RUNTIME_DIR", str(place.runtime_dir))
    for key, value in backend.plain_env.items():
        monkeypatch.setenv(key, value)
    uid = new_uid()
    workspace = place.workspace(uid)
    if os.getuid() == 0:
        os.chmod(workspace, 0o777)  # the provisioner's default uid, not ours, writes here
    with server_secrets():
        km = EraKernelManager(kernel_name="era-python", kernel_spec_manager=place.python_kernelspec())
        await km.start_kernel(cwd=str(workspace), env=dict(os.environ))
    backend.check_launched(km)
    kc = km.client()
    kc.start_channels()
    try:
        await kc.wait_for_ready(timeout=60)
        k = Kernel(backend, km, kc, workspace, uid)
        assert str(k.kernel_dir).startswith(str(place.runtime_dir) + "/")
        found = await k.json("import os, json; print(json.dumps([os.getuid(), os.getcwd(), dict(os.environ)]))")
    finally:
        kc.stop_channels()
        await km.shutdown_kernel(now=True)
    kernel_uid, cwd, env = found
    assert kernel_uid != 0 and cwd == backend.workspace_seen(workspace)
    assert not any(k.startswith(("AWS_", "ERA_")) for k in env), sorted(env)


# ---------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("bad, field_name", [
    ({"uid": 0}, "uid"), ({"uid": -5}, "uid"), ({"uid": "abc"}, "uid"), ({"uid": True}, "uid"),
    ({"pids": -1}, "pids"), ({"cpus": "lots"}, "cpus"), ({"memory": 0}, "memory"),
    ({"env": {"BAD NAME": "x"}}, "env"), ({"env": {"A=B": "x"}}, "env"), ({"env": {"NUL": "a\0b"}}, "env"),
    ({"env": ["A=1"]}, "env"), ({"readonly": ["relative/path"]}, "readonly"), ({"readonly": ["/"]}, "readonly"),
    ({"readonly": ["/usr/../etc"]}, "readonly"), ({"no_such_option": 1}, "no_such_option"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else v)
async def test_bad_launch_options_are_refused_before_anything_starts(backend, place, bad, field_name):
    """Refused with BadRequest naming the field, whether the engine builds the options
    (LaunchOptions) or an embedder passes them as a mapping, and nothing is left behind."""
    workspace = place.workspace(new_uid())
    era = {"workspace": str(workspace), "runtime_dir": str(place.runtime_dir), "uid": new_uid(), **bad}
    before = backend.launched(place)
    km = EraKernelManager(kernel_name="era-python", kernel_spec_manager=place.python_kernelspec())
    with pytest.raises(BadRequest) as refused:
        await km.start_kernel(era=era)
    assert refused.value.field == field_name, refused.value
    assert not km.has_kernel
    assert backend.launched(place) == before
    if field_name != "no_such_option":
        with pytest.raises(BadRequest) as refused:
            LaunchOptions(workspace=workspace, runtime_dir=place.runtime_dir, **{"uid": new_uid(), **bad})
        assert refused.value.field == field_name


