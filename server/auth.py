"""API key and WebSocket Origin checks (docs/security.md cases 23 and 24).

Tokens are compared with ``hmac.compare_digest``; nothing here logs a token.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

from era_kernel.errors import Unauthorized

from .errors import Forbidden


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() not in ("bearer", "token"):  # "token <key>": jupyter_server's GatewayClient
        return None
    return token.strip() or None


def token_matches(token: str | None, api_key: bytes) -> bool:
    if token is None:
        return False
    try:
        candidate = token.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(candidate, api_key)


def require_api_key(api_key: bytes | None, authorization: str | None, query_token: str | None = None) -> None:
    """Raise 401 unless the request carries the key (header, or ``?token=`` when allowed)."""
    if api_key is None:
        return
    # Both candidates are compared, so timing does not tell which one was present.
    ok_header = token_matches(bearer_token(authorization), api_key)
    ok_query = token_matches(query_token, api_key) if query_token is not None else False
    if not (ok_header or ok_query):
        raise Unauthorized("missing or invalid API key; send 'Authorization: Bearer <key>'")


def origin_allowed(origin: str, host: str | None, allowed: frozenset[str]) -> bool:
    """Exact match against the allow-list; without a list, only the server's own host.

    ``https://trusted.example.com.evil.com`` is not ``https://trusted.example.com``:
    comparison is of whole strings, never prefixes or suffixes.
    """
    origin = origin.strip().rstrip("/")
    if allowed:
        return origin in allowed
    netloc = urlsplit(origin).netloc.lower()
    return bool(host) and netloc == host.lower()


def require_origin(origin: str | None, host: str | None, allowed: frozenset[str]) -> None:
    # Non-browser clients send no Origin; browsers always do, and that is what CSWSH abuses.
    if origin is not None and not origin_allowed(origin, host, allowed):
        raise Forbidden("WebSocket Origin is not allowed")
