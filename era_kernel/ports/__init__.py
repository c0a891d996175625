"""Ports of a session reached from outside without giving the session a network
(``netns.py``: sockets made inside its sandbox's network namespace; ``service.py``: the
engine's ``ports``, with ERA's relay mode)."""
