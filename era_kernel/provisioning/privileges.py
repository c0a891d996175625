"""The ``setpriv`` command lines that drop a sandboxed process's privileges, in one place
for kernels (``local.py``) and package setup steps (``setup/runner_local.py``), and the
fork-time tie of a launched process to the server (``tied_to_parent``)."""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable


def drop_privileges(uid: int, gid: int) -> list[str]:
    """Run the rest of the argv as ``uid:gid`` with no supplementary groups, no
    capabilities (inheritable or bounding) and ``no_new_privs`` (setuid binaries do not
    elevate). Called as root, before the sandbox's own command."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs",
            "--inh-caps=-all", "--bounding-set=-all", "--"]


def die_with_parent() -> list[str]:
    """Without bubblewrap (whose ``--die-with-parent`` does it), the process is at least
    killed when the server goes."""
    return ["setpriv", "--pdeathsig", "KILL", "--"]


_PR_SET_PDEATHSIG = 1
_libc = None


def tied_to_parent() -> Callable[[], None]:
    """A ``preexec_fn`` (run in the child between fork and exec): SIGKILL when the
    process that forked it goes, and an immediate exit if it is gone already. Set before
    anything of the launch chain runs, it closes the window in which a server killed
    mid-launch left a kernel behind: the chain's own death signal (bubblewrap's
    ``--die-with-parent``) is set only after the cgroup wrapper and ``prlimit`` ran, and
    a parent that died before then was never noticed. The signal survives the chain's
    execs; a change of uid clears it, which is why bubblewrap sets its own again."""
    global _libc
    if _libc is None:  # loaded here, before the fork: the child must not load libraries
        _libc = ctypes.CDLL(None, use_errno=True)
    libc, parent = _libc, os.getpid()

    def tie() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return tie

