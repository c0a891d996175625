"""The session engine (no HTTP): ``SessionManager`` and its collaborators. See
``manager.py`` for how they are wired, and docs/architecture.md for the whole house."""

from .manager import SessionManager

__all__ = ["SessionManager"]
