"""Session workspaces: the local directory a kernel works in, and the store that keeps
persistent sessions' files between kernels (any fsspec URL).

- ``Workspace``: async, symlink-safe file operations on one local directory.
- ``WorkspaceStore``: crash-safe snapshots of workspaces (push / restore / copy) and
  single-file access to them, on ``file://``, ``s3://`` or ``memory://``.
- ``safe_relpath``: the one check every user-supplied file path goes through.
"""

from .local import Workspace
from .paths import safe_relpath
from .store import WorkspaceStore

__all__ = ["Workspace", "WorkspaceStore", "safe_relpath"]
