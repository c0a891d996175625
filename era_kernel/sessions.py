"""Where ``SessionManager`` was imported from before the engine became a package
(docs/engine-api.md still shows this import): the same class."""

from .engine import SessionManager

__all__ = ["SessionManager"]
