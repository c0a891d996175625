"""gVisor under era-docker: what changes in a kernel's (or a command's) container when
its launch options say ``isolation: gvisor``. The container is otherwise the same
(docker.py); these are the differences, each for a reason found on the ptrace platform of
Debian's runsc, registered by scripts/bootstrap-docker.sh as two runtimes:

- ``runsc`` (``--network=none``) and ``runsc-net`` (``--network=host``): ``oci_runtime``;
- ``--host-uds=create``: the kernel's IPC sockets, bound inside gVisor in the
  bind-mounted IPC directory, are host sockets the server connects to (no relay needed);
- ``--oci-seccomp``: our seccomp profile applies to the code's system calls inside gVisor
  (``security_options``);
- the process limit moves inside gVisor (``process_limits``).
"""

from __future__ import annotations

import json
from typing import Any

from docker.types import Ulimit

from .base import LaunchOptions


def oci_runtime(options: LaunchOptions, network: str) -> str | None:
    """The Docker runtime of a container with these options on ``network``; None: the
    engine's default (runc). gVisor has two, registered by scripts/bootstrap-docker.sh:
    with network ``none`` runsc runs its own network stack with nothing but loopback
    (``--network=none``: its sandbox stack refuses to start in an engine's namespace
    without a bridge); with a network it passes sockets through to the container's
    namespace (``--network=host``), which is the egress network's, or the host's as for
    runc."""
    if options.isolation != "gvisor":
        return None
    bare, networked = options.gvisor_runtimes
    return bare if network == "none" else networked


# The seccomp profile of gVisor containers, applied by gVisor to the code's system calls
# (runsc's --oci-seccomp). Not Docker's default: this runsc answers that profile's
# "clone3: ENOSYS" rule with EPERM, so threads could not start (glibc falls back to clone
# only on ENOSYS; gVisor itself has no clone3). What the default gives that gVisor does not
# already: no user namespaces (unshare, setns, clone with CLONE_NEWUSER), as under runc.
CLONE_NEWUSER = 0x10000000
GVISOR_SECCOMP = json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
    {"names": ["unshare", "setns"], "action": "SCMP_ACT_ERRNO"},
    {"names": ["clone"], "action": "SCMP_ACT_ERRNO",
     "args": [{"index": 0, "value": CLONE_NEWUSER, "valueTwo": CLONE_NEWUSER, "op": "SCMP_CMP_MASKED_EQ"}]}]})


def security_options(options: LaunchOptions) -> list[str]:
    """The containers' ``security_opt``: no-new-privileges, and gVisor's own seccomp profile."""
    return ["no-new-privileges", *([f"seccomp={GVISOR_SECCOMP}"] if options.isolation == "gvisor" else [])]


# gVisor's own threads on the host: ~40 for an idle sandbox, ~6 more per process in it
# (measured: 64 processes, 387 host threads). The session's process limit is enforced
# inside gVisor instead, as RLIMIT_NPROC (its kernel has only this session's processes);
# the host's pids limit stays, as a backstop sized for gVisor's threads.
GVISOR_HOST_PIDS_PER_TASK = 8
GVISOR_HOST_PIDS_BASE = 256


def process_limits(options: LaunchOptions) -> dict[str, Any]:
    """The container's process limits: the engine's pids limit (runc); under gVisor, where
    reaching that limit would kill the whole sandbox, RLIMIT_NPROC inside it (a fork past
    it fails with EAGAIN, as under runc) and a host limit above gVisor's own threads."""
    if options.isolation != "gvisor":
        return {"pids_limit": options.pids}
    return {"pids_limit": options.pids * GVISOR_HOST_PIDS_PER_TASK + GVISOR_HOST_PIDS_BASE,
            "ulimits": [Ulimit(name="nproc", soft=options.pids, hard=options.pids)]}


def runtime_error(runtime: str | None, exc: Exception) -> str | None:
    """A clearer word for an engine that does not know the runtime (Docker says
    "unknown or invalid runtime name")."""
    text = str(getattr(exc, "explanation", None) or exc)
    if runtime and "runtime" in text and runtime in text:
        return (f"the Docker engine has no runtime {runtime!r} for gVisor sessions: install runsc and register it "
                f"(scripts/bootstrap-docker.sh does both)")
    return None
