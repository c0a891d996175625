"""The ``setpriv`` command lines that drop a sandboxed process's privileges, in one place
for kernels (``local.py``) and package setup steps (``setup/runner_local.py``)."""

from __future__ import annotations


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
