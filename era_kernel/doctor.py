"""``era doctor``: what this machine can do, checked for real rather than guessed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Iterator

from .config import Settings

Check = tuple[str, str, str]  # name, OK|WARN|FAIL, detail


def _bwrap() -> Check:
    path = shutil.which("bwrap")
    if not path:
        return ("sandbox", "WARN", "bubblewrap not installed: local kernels run UNSANDBOXED "
                                   "(apt-get install bubblewrap)")
    probe = subprocess.run([path, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
                            "--die-with-parent", "--", "true"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return ("sandbox", "FAIL", f"bubblewrap at {path} cannot create namespaces: {probe.stderr.strip()}")
    return ("sandbox", "OK", f"bubblewrap at {path}; kernels run sandboxed")


def _launcher(settings: Settings) -> Check:
    """How local Python kernels start (ERA_LOCAL_LAUNCHER); for ``fork``, a zygote is
    started for real and asked nothing: it must come up (imports, no threads)."""
    if settings["ERA_LOCAL_LAUNCHER"] != "fork":
        return ("launcher", "OK", "bwrap: each local kernel is a new interpreter in bubblewrap "
                                  "(ERA_LOCAL_LAUNCHER=fork, the default, forks Python kernels from a zygote)")
    if os.getuid() != 0:
        return ("launcher", "OK", "bwrap: the server is not root, and the fork launcher (ERA_LOCAL_LAUNCHER=fork) "
                                  "needs root to build the sandbox itself; each local kernel is a new interpreter in "
                                  "bubblewrap")
    from .provisioning.zygote import Zygote, ZygoteFailed

    try:
        zygote = Zygote(sys.executable)
        zygote.wait_ready()
    except (ZygoteFailed, OSError) as exc:
        return ("launcher", "FAIL", f"ERA_LOCAL_LAUNCHER=fork: {exc}")
    zygote.sock.close()
    zygote.process.wait(timeout=10)
    from .provisioning.forked import INIT_PROGRAM
    from .provisioning.prepared import immortalisable

    what = (f"fork: Python kernels are forked from a zygote of {sys.executable} (other kernels, and Python "
            "kernels with a setup environment, start in bubblewrap)")
    costs = []
    if not os.access(INIT_PROGRAM, os.X_OK):
        costs.append(f"{INIT_PROGRAM} is missing, so each sandbox's init stays a copy of the zygote's Python "
                     "(about 4 MiB more a kernel): run scripts/setup.sh, which builds it with the C compiler")
    if not immortalisable():
        costs.append(f"on Python {sys.version.split()[0]} the zygote cannot make its objects immortal (CPython 3.12 "
                     "and 3.13 can, PEP 683), so each kernel copies about 6 MiB more of its memory: make .venv "
                     "with one of those (rm -r .venv; ERA_PYTHON=python3.13 bash scripts/setup.sh)")
    if costs:
        return ("launcher", "WARN", "; ".join([what, *costs]))
    return ("launcher", "OK", f"{what}; the zygote's objects are immortal, so kernels read them without copying "
                              "their pages")


def _pool(settings: Settings) -> Check:
    """What the warm pool keeps ready (ERA_POOL_SIZE, ``auto`` by default)."""
    from .engine.launcher import pools_fork
    from .engine.pool import auto_pool_size, parse_pool_keys

    try:
        keys = parse_pool_keys(settings["ERA_POOL_KERNELS"], settings["ERA_PROVISIONER"])
    except ValueError as exc:
        return ("pool", "FAIL", str(exc))
    size = settings["ERA_POOL_SIZE"]
    if size == 0 or not keys:
        return ("pool", "OK", "off (ERA_POOL_SIZE=0 or no ERA_POOL_KERNELS): every session starts its own kernel")
    pools = ", ".join(f"{language}:{provisioner}" for language, provisioner in keys)
    if size != "auto":
        return ("pool", "OK", f"{size} kernels kept ready per pool ({pools}; ERA_POOL_SIZE={size})")
    forked = pools_fork(settings, keys)
    size = auto_pool_size(forked, settings["ERA_MAX_KERNELS"])
    from .provisioning.prepared import immortalisable

    why = (f"forked kernels, about {12 if immortalisable() else 17} MiB each" if forked
           else "kernels that are new interpreters, 35-50 MiB each; forked pools keep 12")
    return ("pool", "OK", f"{size} kernels kept ready per pool ({pools}; ERA_POOL_SIZE=auto: {why})")


def _egress(settings: Settings) -> Check:
    """Where local sessions with ``allowInternetAccess: true`` reach the internet."""
    from .engine.launcher import local_egress_refusal

    why = local_egress_refusal(settings)
    if why is None:
        return ("egress", "OK", "local sessions with internet access go out through the egress proxy (public "
                                "addresses only; the host, loopback, private and link-local ranges refused)")
    return ("egress", "WARN", f"local sessions with internet access share the host's network, its loopback services "
                              f"and 169.254.169.254 included: {why} (README: Known limits)")


def _limits() -> Check:
    for tool in ("prlimit", "setpriv"):
        if not shutil.which(tool):
            return ("limits", "FAIL", f"{tool} (util-linux) not found: memory/process limits cannot be applied")
    who = "per-session uids" if os.getuid() == 0 else f"uid {os.getuid()} (run as root for per-session uids)"
    return ("limits", "OK", f"prlimit and setpriv present; kernels run as {who}")


def _cgroups(settings: Settings) -> Check:
    from .provisioning import cgroups

    mode = settings["ERA_KERNEL_CGROUPS"]
    tmp = f"/tmp of {settings['ERA_KERNEL_TMP_SIZE'] / 1024**2:g} MiB"
    if mode == "off":
        return ("cgroups", "WARN", f"ERA_KERNEL_CGROUPS=off: local kernels get no cgroup; memory and process limits "
                                   f"hold per process only; {tmp}")
    found = cgroups.support()
    if not found:
        return ("cgroups", "FAIL" if mode == "on" else "WARN",
                f"local kernels get no cgroup ({found.reason}); memory and process limits hold per process only"
                + ("; ERA_KERNEL_CGROUPS=on: kernel starts will fail" if mode == "on" else ""))
    return ("cgroups", "OK", f"local kernels get their own memory and pids cgroup (v{found.version}, under "
                             f"{found.bases[0].parent}); {tmp}")


def _runtime(settings: Settings) -> Check:
    longest = len(str(settings.runtime_dir / "k" / ("0" * 10) / "kernel-5").encode())
    if longest > 107:
        return ("ipc", "FAIL", f"socket paths under {settings.runtime_dir} would be {longest} bytes (> 107)")
    return ("ipc", "OK", f"socket paths under {settings.runtime_dir} are {longest} bytes (limit 107)")


def _data(settings: Settings) -> Check:
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.data_dir / ".doctor"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        return ("data", "FAIL", f"{settings.data_dir} is not writable: {exc}")
    from .store.base import url_without_password

    return ("data", "OK", f"{settings.data_dir} (store {url_without_password(settings['ERA_STORE_URL'])})")


def _store(settings: Settings) -> Check | None:
    """A PostgreSQL store: reachable, which server, which schema (SQLite is the data check's)."""
    url = settings["ERA_STORE_URL"]
    if not url.startswith(("postgresql:", "postgres:")):
        return None
    from .store.base import url_without_password
    from .store.postgres import MIGRATIONS

    try:
        import psycopg
    except ImportError:
        return ("store", "FAIL", "ERA_STORE_URL is PostgreSQL but psycopg is not installed: "
                                 "pip install 'era-kernel[postgres]'")
    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            server = conn.info.server_version
            schema = None
            if conn.execute("SELECT to_regclass('era_schema_migrations')").fetchone()[0] is not None:
                schema = conn.execute("SELECT MAX(version) FROM era_schema_migrations").fetchone()[0]
    except psycopg.Error as exc:
        return ("store", "FAIL", f"{url_without_password(url)}: {' '.join(str(exc).split())}")
    version = f"schema {schema} of {len(MIGRATIONS)}" if schema else "no schema yet (made at start)"
    return ("store", "OK", f"PostgreSQL {server // 10000}.{server % 10000}, {version}")


def _volumes(settings: Settings) -> Check:
    from .workspaces import volumes

    mode, size = settings["ERA_WORKSPACE_VOLUMES"], volumes.human(settings["ERA_WORKSPACE_MAX_BYTES"])
    if mode == "off":
        return ("volumes", "WARN", "ERA_WORKSPACE_VOLUMES=off: code in a session can fill the data directory's disk")
    found = volumes.support(settings.data_dir)
    if not found:
        return ("volumes", "FAIL" if mode == "on" else "WARN",
                f"workspaces are plain directories ({found.reason}): code in a session can fill the data "
                "directory's disk" + ("; ERA_WORKSPACE_VOLUMES=on: the server will not start" if mode == "on" else ""))
    return ("volumes", "OK", f"each workspace is its own ext4 filesystem of {size} (ERA_WORKSPACE_MAX_BYTES); "
                             "writes past it fail with ENOSPC")


def _docker() -> Check:
    try:
        import docker

        client = docker.from_env(timeout=3)
        version = client.version().get("Version", "?")
    except Exception as exc:
        return ("docker", "WARN", f"no Docker engine answers ({type(exc).__name__}); the docker provisioner "
                                  "is unavailable (scripts/bootstrap-docker.sh starts one)")
    return ("docker", "OK", f"engine {version} at {os.environ.get('DOCKER_HOST', 'the default socket')}")


def _gvisor(settings: Settings) -> Check | None:
    """gVisor for ``"isolation": "gvisor"`` sessions: the engine must know both runtimes by
    the names the settings give, and ``runsc`` must start a sandbox on this machine (the
    ptrace platform, as bootstrap-docker.sh registers it: it needs no KVM). None when no
    Docker engine answers: the docker check already says so."""
    try:
        import docker

        runtimes = docker.from_env(timeout=3).info().get("Runtimes") or {}
    except Exception:
        return None
    wanted = [settings[name] for name in ("ERA_DOCKER_GVISOR_RUNTIME", "ERA_DOCKER_GVISOR_NET_RUNTIME")]
    missing = [name for name in wanted if name not in runtimes]
    if missing:
        return ("gvisor", "WARN", f"the Docker engine has no runtime {', '.join(missing)}: \"isolation\": "
                                  "\"gvisor\" sessions cannot start (scripts/bootstrap-docker.sh registers runsc)")
    runsc = (runtimes[wanted[0]] or {}).get("path") or shutil.which("runsc")
    if not runsc or not shutil.which(runsc):
        return ("gvisor", "FAIL", f"runtime {wanted[0]} is registered but its binary ({runsc}) is missing")
    if os.getuid() != 0:  # `runsc do` needs root; the engine runs it as root anyway
        return ("gvisor", "OK", f"runtimes {', '.join(wanted)} registered ({runsc}); not started (needs root)")
    try:
        probe = subprocess.run([runsc, "--platform=ptrace", "--network=none", "do", "/bin/true"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ("gvisor", "FAIL", f"{runsc} do /bin/true: {exc}")
    if probe.returncode != 0:
        tail = " ".join((probe.stderr or probe.stdout).split())[-300:]
        return ("gvisor", "FAIL", f"runtimes registered, but {runsc} cannot start a sandbox here: {tail}")
    return ("gvisor", "OK", f"runtimes {', '.join(wanted)} registered; {runsc} starts a sandbox (ptrace platform)")


def _kernel() -> Check:
    try:
        import ipykernel
        import jupyter_client
    except ImportError as exc:
        return ("kernel", "FAIL", str(exc))
    return ("kernel", "OK", f"python {sys.version.split()[0]}, ipykernel {ipykernel.__version__}, "
                            f"jupyter_client {jupyter_client.__version__}")


def _setup_network(settings: Settings) -> Check:
    """Where package builds may connect: the registries the operator's configuration names."""
    if settings["ERA_SETUP_NETWORK"] != "proxy":
        return ("setup", "WARN", "package builds use the host's network (ERA_SETUP_NETWORK=host): a package's "
                                 "install code reaches the host's loopback services and 169.254.169.254")
    if os.geteuid() != 0:
        return ("setup", "WARN", "package builds use the host's network: the server is not root, and the egress "
                                 "proxy's listener needs root to enter a sandbox (README: Known limits)")
    from .egress.registries import derive

    registries = derive(settings)
    return ("setup", "OK", "package builds reach only these registries, through the egress proxy: "
                           + ("; ".join(registries.sources) or "none (pip, npm and go name none)"))


def run_checks(settings: Settings | None = None) -> Iterator[Check]:
    settings = settings or Settings.from_env()
    yield _kernel()
    yield _bwrap()
    yield _launcher(settings)
    yield _pool(settings)
    yield _egress(settings)
    yield _setup_network(settings)
    yield _limits()
    yield _cgroups(settings)
    yield _runtime(settings)
    yield _data(settings)
    if (store := _store(settings)) is not None:
        yield store
    yield _volumes(settings)
    yield _docker()
    if (gvisor := _gvisor(settings)) is not None:
        yield gvisor
