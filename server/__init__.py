"""ERA Kernel's HTTP/WebSocket server (import name ``era_server``).

Importing this package is cheap on purpose: ``main`` binds the port and answers
``/health`` before tornado, pydantic or the engine are imported (see ``boot``).
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the process exit code."""
    from .boot import main as boot_main

    return boot_main(argv)


__all__ = ["main"]
