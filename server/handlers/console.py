"""The web console: static files (``server/console``) served at ``/`` and ``/console/...``.

The page is on the API's origin, so the policy sent with it is what keeps kernel output
from running there: scripts only from our own files (no inline script, no eval), no
plugins, no framing of the console by other sites, images from us or ``data:`` URLs.
Styles may be inline (xterm.js and CodeMirror set them); a style cannot run code.

HTML outputs go into ``<iframe sandbox="allow-scripts" src="/console/frame.html">``:
without allow-same-origin the frame has an opaque origin (no sessionStorage of ours, no
key), and ``frame.html`` comes with its own policy, ``FRAME_POLICY``: an output's
scripts run (charts need them) but may connect nowhere, so they cannot call the API
even without the key. The page itself needs no key: every API call it makes does.
"""

from __future__ import annotations

from pathlib import Path

from tornado.web import StaticFileHandler

from ..errors import JsonErrors

CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data: blob:",
    "font-src 'self'",
    "connect-src 'self'",  # CSP 3: 'self' includes ws:/wss: to this host
    "frame-src 'self'",
    "child-src 'self'",
    "worker-src 'none'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])


FRAME_FILE = "frame.html"
FRAME_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'unsafe-inline' 'unsafe-eval' https: data: blob:",  # outputs' own scripts and CDN libraries
    "style-src 'unsafe-inline' https: data:",
    "img-src data: blob: https:",
    "font-src data: https:",
    "media-src data: blob: https:",
    "connect-src 'none'",  # no fetch, XHR, WebSocket or beacon: not to the API, not anywhere
    "form-action 'none'",
    "base-uri 'none'",
])


class ConsoleHandler(JsonErrors, StaticFileHandler):
    """A static file of the console, with the page's security headers; errors (a missing
    file: 404) in the API's JSON shape, as everywhere else on the server."""

    def allowed_methods(self) -> list[str]:
        return ["GET", "HEAD"]

    def set_extra_headers(self, path: str) -> None:
        self.set_header("Content-Security-Policy", FRAME_POLICY if path == FRAME_FILE else CONTENT_SECURITY_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cross-Origin-Opener-Policy", "same-origin")
        # A new release changes the files under the same names: revalidate every time.
        self.set_header("Cache-Control", "no-cache")
