"""Session-scoped storage tokens: what code in a session shows the storage routes instead
of the server's API key (which never enters a session).

A token is ``era_st.<session id>.<HMAC-SHA256(secret, "era-storage:" + session id)>``,
the secret a random key made at first use in ``$ERA_DATA_DIR/storage-secret`` (mode
0600). It proves which session calls; the session's record then says whose it is, so a
deleted session's token stops working. Nothing is stored per token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

from ..validation import is_session_id

PREFIX = "era_st"
SECRET_FILE = "storage-secret"


class SessionTokens:
    def __init__(self, data_dir: Path):
        self._path = data_dir / SECRET_FILE
        self._secret: bytes | None = None

    def _key(self) -> bytes:
        if self._secret is None:
            from ..engine.callbacks import _stored_secret  # the same O_EXCL, 0600 first-use file

            self._secret = _stored_secret(self._path).encode()
        return self._secret

    def _mac(self, session_id: str) -> str:
        digest = hmac.new(self._key(), b"era-storage:" + session_id.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def token(self, session_id: str) -> str:
        return f"{PREFIX}.{session_id}.{self._mac(session_id)}"

    def session_of(self, token: str | None) -> str | None:
        """The session id a token was made for, or None when it is not one of ours."""
        if not token or not token.startswith(PREFIX + "."):
            return None
        try:
            _, session_id, mac = token.split(".")
        except ValueError:
            return None
        if not is_session_id(session_id):
            return None
        return session_id if hmac.compare_digest(mac.encode(), self._mac(session_id).encode()) else None
