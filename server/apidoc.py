"""What each handler method accepts and answers, declared beside the handler.

Handlers carry ``API = {"get": Op(...), ...}``; ``openapi`` turns the route table plus
these into ``/api/openapi.json``, and the tests walk the same table (auth, error shape).
Models are named, not imported, so importing a handler never imports pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Op:
    summary: str
    # Request body: a model name from era_kernel.models or server.schemas, or one of
    # "bytes" (raw upload) / "code" (JSON CodeBody or text/plain); None when no body.
    body: str | None = None
    # Response: a model name, "bytes" (download), "sse", "websocket", "jupyter-websocket"
    # (server/jupyter.py), "text" (Prometheus text format), or None (no body).
    response: str | None = None
    media_type: str = "application/json"  # of a model response (the notebook's is application/x-ipynb+json)
    status: int = 200
    also: tuple[tuple[int, str], ...] = ()  # other successful answers: (status, model name)
    errors: tuple[int, ...] = (400,)
    query: dict[str, str] = field(default_factory=dict)  # name -> description (strings)
    description: str = ""
    tags: tuple[str, ...] = ()  # whether it needs the API key is the route table's (routes.py)
