"""Package setup for sessions: pip, npm and go, built once per distinct set of packages
into a shared, content-addressed environment that kernels see read-only; then each
session's own files and ``commands``, in its own sandbox.

- ``spec``: validation, canonical form and hash of a ``setup`` body (ERA's list and
  text forms, ``envs``);
- ``session``: the session's part, ``CommandSandbox`` (what a command can change);
- ``steps`` / ``layout``: what runs, and where its output goes in an environment;
- ``runner_local`` / ``runner_docker``: a step in bubblewrap or in a container;
- ``network``: where builds and commands may connect (the package registries, through
  the egress proxy);
- ``cache``: environment directories and their single-object archives in the store;
- ``manager``: ``SetupManager``, the engine's interface (background setups, live logs,
  status transitions, launch extras for kernels);
- ``cli``: ``era setup`` (build or warm an environment with live progress).
"""

from .manager import SetupManager
from .spec import normalize
from .steps import SetupFailed

__all__ = ["SetupFailed", "SetupManager", "normalize"]
