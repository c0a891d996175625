"""What a process forked from the zygote (``zygote.py``) does to become a sandboxed
Python kernel: the same isolation bubblewrap gives (``local.bwrap_argv``), built in
process, then ipykernel run in the same interpreter, as ``python -m ipykernel_launcher``
would run it.

The zygote forks with ``CLONE_NEWPID`` already unshared, so the child is pid 1 of a new
pid namespace (``init``). It forks the kernel (pid 2, the process that runs user code)
at once, and the kernel, still root:
1. joins the kernel's cgroup (the server made it), init with it, so all that follows is
   counted there;
2. sets the rlimits ``prlimit`` would (RLIMIT_AS, RLIMIT_NPROC, no core dumps), on init too;
3. unshares the mount, ipc, uts and (unless the session has internet access) network
   namespaces, and the cgroup namespace once inside its group;
4. builds the filesystem view bubblewrap builds: a recursive bind of the host root made
   read-only, tmpfs over ``/tmp``, ``/root``, ``/home``, ``/run`` and the server's data and
   runtime directories (the session's own ``/tmp`` directory instead, when it has one),
   the Python prefixes and package directories bound read-only, the workspace and the IPC
   directory read-write, a fresh ``/proc`` for the new pid namespace, a minimal ``/dev``;
   then pivots into it, the host root detached;
5. brings the loopback interface up (as bubblewrap does);
6. tells init, which joins those namespaces (through a pidfd of the kernel) and both drop
   to the session's uid and gid (no supplementary groups, an empty bounding set, no
   capabilities), set ``no_new_privs`` and install the seccomp filter (``seccomp.py``);
7. runs ipykernel, while init stays a minimal init: reaps orphans, passes termination
   signals on, exits with the kernel's status (which ends everything in the namespace,
   as bubblewrap's own pid 1 does).

``PR_SET_PDEATHSIG``: init dies with the zygote, the zygote with the server.
Any failure before the kernel runs is written to stderr (the server's output tail, read
into the failed start's error) and ends the process with status 127.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
import socket
import struct
import sys
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x20000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
PR_SET_DUMPABLE, PR_SET_NAME = 4, 15
INIT_NAME = "era-fork-init"  # the sandbox's pid 1, in ps (its command line and name)
# init's own program (fork_init.c), built by scripts/setup.sh; without it init stays Python.
INIT_PROGRAM = os.path.join(sys.prefix, "libexec", INIT_NAME)
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 24, 38, 22
SECCOMP_MODE_FILTER = 2
_SYSCALLS = {"x86_64": {"pivot_root": 155, "mount_setattr": 442, "capset": 126},
             "aarch64": {"pivot_root": 41, "mount_setattr": 442, "capset": 91}}
AT_RECURSIVE, AT_EMPTY_PATH = 0x8000, 0x1000
MOUNT_ATTR_RDONLY = 0x1
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


class SetupFailed(RuntimeError):
    pass


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise SetupFailed(f"{what}: {os.strerror(err)}")
    return result


def _syscall(name: str, *args: Any) -> int:
    number = _SYSCALLS[platform.machine()][name]
    return _check(_libc.syscall(ctypes.c_long(number), *args), name)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or fstype} on {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), MNT_DETACH), f"umount {target}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           f"prctl {option}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def make_readonly(path: str) -> None:
    """Every mount at and below ``path`` read-only (``mount_setattr``, Linux 5.12)."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    try:
        _syscall("mount_setattr", ctypes.c_int(fd), b"", ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
                 ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    finally:
        os.close(fd)


def _makedirs(path: str, mode: int = 0o755) -> None:
    """Mount points inside our own fresh tmpfs masks (or the session's /tmp, whose levels
    the server made root's beforehand: ``local.prepare_tmp_mountpoints``)."""
    if not os.path.isdir(path):
        _makedirs(os.path.dirname(path), mode)
        try:
            os.mkdir(path, mode)
            os.chmod(path, mode)  # not the umask's
        except FileExistsError:
            pass


# ---------------------------------------------------------------------------- the filesystem


def build_root(plan: dict[str, Any]) -> None:
    """Steps 3-4 of the module docstring (mount namespace already ours)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    base = "/tmp"  # as bubblewrap: our tmpfs here becomes the root, the host's at /oldroot
    mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for name in ("oldroot", "newroot"):
        os.mkdir(f"{base}/{name}", 0o755)
    os.chdir(base)
    _syscall("pivot_root", b".", b"oldroot")
    os.chdir("/")
    old, new = "/oldroot", "/newroot"
    mount(old, new, None, MS_BIND | MS_REC)
    make_readonly(new)
    for path, mode, size in plan["masks"]:
        if path == "/tmp" and plan.get("tmp_dir"):
            mount(old + plan["tmp_dir"], new + "/tmp", None, MS_BIND | MS_REC)
            continue
        _makedirs(new + path)
        options = f"mode={mode:o}" + (f",size={size}" if size else "")
        mount("tmpfs", new + path, "tmpfs", MS_NOSUID | MS_NODEV, options)
    for path in plan["readonly"]:
        if os.path.isdir(old + path):
            _makedirs(new + path)
            mount(old + path, new + path, None, MS_BIND | MS_REC)
            make_readonly(new + path)
    for path in plan["writable"]:
        _makedirs(new + path)
        mount(old + path, new + path, None, MS_BIND | MS_REC)
    _build_dev(old, new + "/dev", plan["dev_size"])
    umount(new + "/proc")  # the host's, with its submounts
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.chdir(new)
    _syscall("pivot_root", b".", b".")  # the old root (our tmpfs, the host's under it) on top ...
    umount(".")  # ... and gone
    os.chdir("/")


def _build_dev(old: str, dev: str, size: int) -> None:
    """bubblewrap's ``--dev``: a tmpfs with the harmless device nodes bound from the host,
    a private devpts, /dev/shm (POSIX shared memory and semaphores: bounded like /tmp),
    and the fd links."""
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, f"mode=0755,size={size}")
    for name in DEV_NODES:
        if os.path.exists(f"{old}/dev/{name}"):
            os.close(os.open(f"{dev}/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
            mount(f"{old}/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    os.mkdir(f"{dev}/shm", 0o1777)
    os.chmod(f"{dev}/shm", 0o1777)
    os.mkdir(f"{dev}/pts", 0o755)
    try:
        mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
        os.symlink("pts/ptmx", f"{dev}/ptmx")
    except SetupFailed:
        pass  # no pseudo-terminals then (as in a container without devpts)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("core", "/proc/kcore")):
        os.symlink(target, f"{dev}/{name}")


def loopback_up() -> None:
    """A new network namespace's ``lo`` is down; ipykernel binds 127.0.0.1 (its pipe for
    forked processes' output)."""
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


# ---------------------------------------------------------------------------- privileges


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_prepared: dict[str, Any] = {}


def prepare() -> None:
    """In the zygote, once: what every kernel's setup would otherwise work out again (the
    host's last capability, the seccomp program), so the forked processes run less code
    and write fewer of the zygote's pages. Neither depends on a session."""
    from .seccomp import build_filter

    _prepared["cap_last"] = int(open("/proc/sys/kernel/cap_last_cap").read())
    program = build_filter()
    if program is not None:
        buffer = ctypes.create_string_buffer(program, len(program))
        _prepared["seccomp"] = (buffer, _SockFprog(len(program) // 8, ctypes.addressof(buffer)))


def drop_privileges(uid: int, gid: int) -> None:
    """``setpriv --reuid --regid --clear-groups --no-new-privs --inh-caps=-all
    --bounding-set=-all`` (privileges.drop_privileges), in process."""
    last = _prepared.get("cap_last")
    if last is None:
        last = int(open("/proc/sys/kernel/cap_last_cap").read())
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from root to non-zero uids: permitted and effective sets emptied
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    _syscall("capset", ctypes.byref(header), ctypes.byref(data))  # the inheritable set too
    prctl(PR_SET_NO_NEW_PRIVS, 1)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp() -> None:
    if "seccomp" in _prepared:
        fprog = _prepared["seccomp"][1]
    else:
        from .seccomp import build_filter

        program = build_filter()
        if program is None:
            return  # an architecture without a table: as filter_fd(), bubblewrap gets none either
        buffer = ctypes.create_string_buffer(program, len(program))
        fprog = _SockFprog(len(program) // 8, ctypes.addressof(buffer))
    _check(_libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), "seccomp")


def set_cmdline(argv: list[str]) -> None:
    """Show the kernel's own command line in /proc/<pid>/cmdline (``ps``, the orphan
    reaper's check of a recorded pid, the tests' process searches: they name the kernel's
    connection file), not the zygote's. Written over the zygote's own argv in place, as
    setproctitle does: ``PR_SET_MM`` would point the kernel at a new buffer but needs
    CAP_SYS_RESOURCE, which containers commonly drop. The zygote's command line carries
    padding for this (``Zygote``: ``CMDLINE_ROOM``); a longer command line is cut short
    (its head names the connection file). The last byte stays NUL: readers then take the
    area as NUL-separated arguments (the padding reads as empty ones)."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end
    except (OSError, IndexError, ValueError):
        return
    room = end - start
    if room <= 1:
        return
    raw = (b"\0".join(a.encode() for a in argv) + b"\0")[:room - 1]
    ctypes.memmove(start, raw + b"\0" * (room - len(raw)), room)


ENV_ROOM_VAR = "ERA_ENV_ROOM"  # the zygote's first environment entry: room for each kernel's


def set_environ(env: dict[str, str]) -> None:
    """Show the kernel's environment in /proc/<pid>/environ, as an exec'd kernel's shows
    the one it started with: a session's commands start from it (commands/channel.py).
    Written in place over the zygote's environment area, whose first entry is padding
    left for it (``Zygote``: ``ENV_ROOM``); the zygote's own entries after it are zeroed,
    and the padding's unused rest (spaces, no ``=``) reads as no variable. Only the pages
    written become the kernel's own. An environment larger than the room is cut at a
    variable, said in the kernel's log."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        start, end = int(fields[47]), int(fields[48])  # env_start, env_end
    except (OSError, IndexError, ValueError):
        return
    area = ctypes.string_at(start, end - start)
    if not area.startswith(ENV_ROOM_VAR.encode() + b"="):
        return
    room = area.index(b"\0")
    data, left_out = b"", []
    for key, value in env.items():
        item = os.fsencode(f"{key}={value}") + b"\0"
        if len(data) + len(item) > room:
            left_out.append(key)
            continue
        data += item
    if left_out:
        os.write(2, f"era fork launcher: /proc/<pid>/environ leaves out {', '.join(left_out)} (too large)\n".encode())
    ctypes.memset(start + room, 0, len(area) - room)
    ctypes.memmove(start, data, len(data))
    if len(data) < room:
        ctypes.memset(start + len(data), 0, 1)


# ---------------------------------------------------------------------------- the sequence


def become_kernel(request_fd: int, output_fd: int) -> None:
    """In the forked child (pid 1 of its pid namespace, root): the sandbox's init. Never
    returns.

    It forks the kernel (pid 2) first thing and leaves the building to it (``_build``);
    once the kernel has made its namespaces it tells init, which joins them through a
    pidfd and drops to the same uid, capabilities, ``no_new_privs`` and seccomp filter
    (``_join``): the two end up exactly as isolated as when init built everything and
    forked the kernel last. Why this order: every page of the zygote's a process writes
    becomes its own copy, and a page init wrote is copied again when the kernel writes it
    too. Run by init, the setup's Python left it about 2.6 MiB of private pages; now it
    runs in the kernel, which writes most of those pages anyway, and init keeps a few."""
    status = 127
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.dup2(output_fd, 1)
        os.dup2(output_fd, 2)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        import resource

        # The zygote's socket to the server, its wakeup pipe: not ours; the request is the kernel's.
        top = max(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        os.closerange(3, request_fd)
        os.closerange(request_fd + 1, top)
        os.setsid()
        built_r, built_w = os.pipe()
        kernel = os.fork()
        if kernel == 0:
            os.close(built_r)
            _build(request_fd, built_w)  # never returns
        # Held from here: the kernel's pid can only be reused once it is reaped, by us.
        pidfd = os.pidfd_open(kernel)
        os.close(request_fd)
        os.close(built_w)
        program = _open_init_program()  # here, while the host's files are still ours to open
        note = b""
        while chunk := os.read(built_r, 4096):
            note += chunk
        os.close(built_r)
        if note:  # empty: the kernel's setup failed before its namespaces (its error is in the log)
            import json

            plan = json.loads(note)
            _join(pidfd, plan)
            if program >= 0:
                _exec_init(program, kernel, plan["argv"])  # returns only if the exec failed
            _name_init(plan["argv"])
        os.close(pidfd)
        status = _init(kernel)
    except BaseException as exc:  # noqa: BLE001 - whatever it is, the server reads it in the kernel's log
        try:
            os.write(2, f"era fork launcher: kernel setup failed: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(status)


def _build(request_fd: int, built_w: int) -> None:
    """pid 2, still root: steps 1-6 of the module docstring for itself and for init (its
    cgroup, its rlimits; the namespaces and the privileges init takes itself, ``_join``),
    then the kernel. Never returns; a failure ends it with status 127, and init with it."""
    status = 127
    try:
        import json
        import resource

        os.lseek(request_fd, 0, os.SEEK_SET)
        with os.fdopen(request_fd, "rb") as fh:
            request = json.loads(fh.read())
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        for path in request["cgroups"]:
            for pid in (b"0", b"1"):  # ourselves, then init (pid 1 of our namespace); one pid a write
                fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
        limits = ((resource.RLIMIT_AS, request["rlimit_as"]), (resource.RLIMIT_NPROC, request["rlimit_nproc"]),
                  (resource.RLIMIT_CORE, 0))
        for which, value in limits:
            resource.setrlimit(which, (value, value))
            resource.prlimit(1, which, (value, value))
        flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if request["allow_network"] else CLONE_NEWNET)
        flags |= CLONE_NEWCGROUP if request["cgroups"] else 0
        unshare(flags)
        build_root(request)
        if not request["allow_network"]:
            loopback_up()
        # Before our privileges go, so nothing the session runs can write to init.
        os.write(built_w, json.dumps({"flags": flags, "uid": request["uid"], "gid": request["gid"],
                                      "argv": request["argv"][:2]}).encode())
        os.close(built_w)
        set_cmdline(request["cmdline"])
        set_environ(request["env"])
        drop_privileges(request["uid"], request["gid"])
        # Again: a change of uid clears the parent-death signal.
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # Changing uid without an exec left us undumpable: /proc/self would stay root's and
        # the kernel could not, say, lower its own oom_score_adj as an exec'd one can.
        prctl(PR_SET_DUMPABLE, 1)
        install_seccomp()
        os.chdir(request["cwd"])
    except BaseException as exc:  # noqa: BLE001 - the server reads it in the kernel's log
        try:
            os.write(2, f"era fork launcher: kernel setup failed: {exc}\n".encode())
        except OSError:
            pass
        os._exit(status)
    _run_kernel(request)  # never returns


def _join(pidfd: int, plan: dict[str, Any]) -> None:
    """init, root: into the kernel's namespaces (mount, ipc, uts, network, cgroup: the
    mount namespace's root and working directory with them), then the kernel's uid and
    gid, no capabilities, ``no_new_privs``, the seccomp filter."""
    setns(pidfd, plan["flags"])
    os.chdir("/")
    drop_privileges(plan["uid"], plan["gid"])
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # cleared by the change of uid
    prctl(PR_SET_DUMPABLE, 1)  # as the kernel: the same uid's processes, alike
    install_seccomp()


def _name_init(argv: list[str]) -> None:
    """init that stays Python: shown in ps as ``era-fork-init -f <connection file>``, as
    its own program is (its argv and name): told apart from its kernel, as bubblewrap's
    own process is (the orphan reaper checks the recorded pid, this one, by it)."""
    set_cmdline([INIT_NAME, *argv])
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(INIT_NAME.encode()), ctypes.c_ulong(0), ctypes.c_ulong(0),
                ctypes.c_ulong(0))


def _open_init_program() -> int:
    """A descriptor of init's own program (``INIT_PROGRAM``), or -1 without one."""
    try:
        return os.open(INIT_PROGRAM, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _exec_init(program: int, kernel: int, argv: list[str]) -> None:
    """Become init's own program (fork_init.c), which does what ``_init`` does: as a copy
    of the zygote, init kept some 3.9 MiB of private pages a kernel for a wait loop; the
    exec drops them all (a few KiB left). The uid, the namespaces, ``no_new_privs``, the
    seccomp filter and the death signal stay across it (no set-uid, no file
    capabilities). Through the descriptor opened before joining: the program's path
    need not be in the sandbox's view. Returns only if the exec failed (said in the
    kernel's log; init stays Python)."""
    try:
        os.execve(program, [INIT_NAME, *argv], {"ERA_INIT_KERNEL": str(kernel)})
    except OSError as exc:
        os.write(2, f"era fork launcher: {INIT_PROGRAM} did not start ({exc}); init stays in Python\n".encode())
    finally:
        os.close(program)


def _init(kernel: int) -> int:
    """pid 1: pass termination and interrupt signals to the kernel, reap orphans, and exit
    with the kernel's status."""
    def forward(signum, _frame):
        try:
            os.kill(kernel, signum)
        except OSError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if pid == kernel:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _run_kernel(request: dict[str, Any]) -> None:
    """pid 2: ``python -m ipykernel_launcher <argv>``, in this interpreter."""
    code = 1
    try:
        os.setsid()  # bubblewrap's --new-session: no controlling terminal to push input into
        for signum in (*FORWARDED, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL if signum != signal.SIGINT else signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        import importlib.util

        spec = importlib.util.find_spec("ipykernel_launcher")
        sys.argv = [spec.origin if spec and spec.origin else "ipykernel_launcher", *request["argv"]]
        sys.path[0] = request["cwd"]  # `-m` puts the working directory first
        # PYTHONPATH is read at interpreter start, long past for a fork: the launcher lets
        # through only our SDK directory there (launch_fork._sdk_only), added here instead.
        sys.path.extend(p for p in os.environ.get("PYTHONPATH", "").split(":") if p and p not in sys.path)
        from ipykernel.kernelapp import IPKernelApp

        from .prepared import list_modules_as_prepared, use_parsed_command_line

        app = IPKernelApp.instance()  # what ipykernel_launcher's launch_new_instance does
        use_parsed_command_line(app, request["argv"])
        with list_modules_as_prepared():
            app.initialize(request["argv"])
        app.start()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os._exit(code)
