"""Session workspaces: the local directory a kernel works in, and the store that keeps
persistent sessions' files between kernels (any fsspec URL).

- ``Workspace``: async, symlink-safe file operations on one local directory.
- ``WorkspaceStore``: crash-safe snapshots of workspaces (push / restore / copy) and
  single-file access to them, on ``file://``, ``s3://`` or ``memory://``.
- ``safe_relpath``: the one check every user-supplied file path goes through.

``WorkspaceStore`` is imported on first use: it brings fsspec (a tenth of a second),
which the kernel provisioners, using only ``fdtree`` to remove kernel directories, do
not need.
"""

from typing import Any

from .local import Workspace
from .paths import safe_relpath

__all__ = ["Workspace", "WorkspaceStore", "safe_relpath"]


def __getattr__(name: str) -> Any:
    if name == "WorkspaceStore":
        from .store import WorkspaceStore

        return WorkspaceStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
