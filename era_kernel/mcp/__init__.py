"""MCP for ERA Kernel: ERA's tools and session resources, served over stdio (``era mcp``),
streamable HTTP (``/mcp``) and ERA's own JSON-RPC endpoint (``/mcp/v1``).

One tool layer (``tools.py`` definitions, ``handlers.py`` behaviour, ``results.py``
formatting) calls the public HTTP API through ``era_client``, so it works against any
ERA Kernel server, local or remote, and behaves the same over every transport."""
