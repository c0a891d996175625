"""Workspace files: raw bytes in and out.

The path arrives percent-decoded by tornado (``%2e%2e/`` is ``../`` here) and is passed
as is to the engine, which validates it against the workspace (traversal, NUL,
symlinks: docs/security.md cases 12-13). Downloads are attachments with ``nosniff`` and
a sandboxing CSP, so HTML a session wrote never renders on the API's origin
(docs/security.md case 25).
"""

from __future__ import annotations

import mimetypes
from urllib.parse import quote

from ..apidoc import Op
from .base import BaseHandler

FILE_ERRORS = (400, 404)


def attachment_header(path: str) -> str:
    name = path.rsplit("/", 1)[-1] or "download"
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;' else "_" for c in name)[:200]
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(name[:200], safe='')}"


def guess_type(path: str) -> str:
    mime, encoding = mimetypes.guess_type(path, strict=False)
    if mime is None or encoding is not None:  # .gz etc.: the bytes are not of type `mime`
        return "application/octet-stream"
    return mime


class FilesHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("List the workspace's files", response="FileList", errors=FILE_ERRORS)}

    async def get(self, sid: str) -> None:
        files = await self.engine.list_files(sid)
        self.send_json({"files": files, "count": len(files)})


class FileHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {
        "get": Op("Download a file (raw bytes, as an attachment)", response="bytes", errors=FILE_ERRORS),
        "put": Op("Upload a file (raw request body)", body="bytes", response="FileWritten",
                  errors=(400, 404, 413)),
        "delete": Op("Delete a file", response="FileDeleted", errors=FILE_ERRORS),
    }

    async def get(self, sid: str, path: str) -> None:
        data = await self.engine.read_file(sid, path)
        self.set_header("Content-Type", guess_type(path))
        self.set_header("Content-Disposition", attachment_header(path))
        self.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
        self.finish(data)

    async def put(self, sid: str, path: str) -> None:
        self.send_json(await self.engine.write_file(sid, path, self.body_bytes()))

    async def delete(self, sid: str, path: str) -> None:
        await self.engine.delete_file(sid, path)
        self.send_json({"deleted": path, "session_id": sid})
