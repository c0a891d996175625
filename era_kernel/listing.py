"""Paging over the sessions: the opaque cursor, one bounded page, and whole passes in chunks.

The order is the store's ``seq`` (``MetadataStore.list_sessions``): unique, only growing
and never reused, so a cursor naming the last ``seq`` a client saw stays valid while
sessions are created (they come after it) or deleted (the one it names included), and
nothing is listed twice or skipped. ``created_at`` would not do: it is the wall clock,
which can step back, and two sessions can share a millisecond.

A page ends at ``limit`` documents or once its JSON passes ``max_bytes``, whichever comes
first, so one answer stays bounded however large each session's data and metadata are.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any, AsyncIterator, Awaitable, Callable

from .errors import BadRequest
from .store.base import MetadataStore

CHUNK = 100  # records read from the store per call: the peak a page or a pass holds at once
_CURSOR_CHARS = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CURSOR_BODY = re.compile(rb"^s([1-9][0-9]{0,18})$")


class SessionPage(list):
    """Session documents, oldest first; ``next_cursor`` continues after the last of
    them, and is None when there is nothing after it."""

    next_cursor: str | None = None


def encode_cursor(seq: int) -> str:
    # Opaque to clients (they only hand it back); versioned by its "s" prefix.
    return base64.urlsafe_b64encode(b"s%d" % seq).decode().rstrip("=")


def decode_cursor(cursor: Any) -> int:
    """The ``seq`` a cursor names; anything that ``encode_cursor`` did not make is a 400."""
    bad = BadRequest("invalid 'cursor': pass back the next_cursor of a previous page", field="cursor")
    if not isinstance(cursor, str) or not _CURSOR_CHARS.match(cursor):
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError):
        raise bad from None
    match = _CURSOR_BODY.match(raw)
    if match is None or encode_cursor(int(match[1])) != cursor:  # one spelling per cursor
        raise bad
    return int(match[1])


async def read_page(store: MetadataStore, document: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], *,
                    limit: int | None, cursor: str | None, cap: int, max_bytes: int,
                    owner: str | None = None) -> SessionPage:
    """Up to ``limit`` (1 to ``cap``; None: ``cap``) documents of the records after the
    cursor's, cut once their JSON passes ``max_bytes`` (never before the first, so paging
    always moves on). A bad limit or cursor is a 400."""
    if limit is None:
        limit = cap
    elif isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= cap:
        raise BadRequest(f"query parameter 'limit' must be an integer from 1 to {cap}", field="limit")
    after = None if cursor is None else decode_cursor(cursor)
    page, size = SessionPage(), 0
    while True:
        want = min(CHUNK, limit - len(page)) + 1  # one more than needed: is there a next page?
        records = await store.list_sessions(limit=want, after=after, owner=owner)
        for record in records:
            # Cut before this record; `after` is then the seq of the page's last document.
            if len(page) == limit:
                page.next_cursor = encode_cursor(after)
                return page
            doc = await document(record)
            doc_size = len(json.dumps(doc, default=str))
            if page and size + doc_size > max_bytes:
                page.next_cursor = encode_cursor(after)
                return page
            page.append(doc)
            size += doc_size
            after = record["seq"]
        if len(records) < want:
            return page


async def record_chunks(store: MetadataStore, owner: str | None = None) -> AsyncIterator[list[dict[str, Any]]]:
    """Every record, oldest first, ``CHUNK`` at a time (passes over all sessions: start,
    bulk delete, culling), so a pass never holds the whole table."""
    after = None
    while True:
        records = await store.list_sessions(limit=CHUNK, after=after, owner=owner)
        if records:
            yield records
        if len(records) < CHUNK:
            return
        after = records[-1]["seq"]
