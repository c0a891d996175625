"""The API's one error shape, and concrete paths for route templates (to probe every route)."""

from __future__ import annotations

import json


def assert_error_shape(status: int, body: bytes, expected: int | tuple[int, ...] | None = None) -> dict:
    """The one error shape: {"error": sentence, "status_code": status, "field"?}, no traceback;
    ERA's own extras where it gives them (`hint`, the taken `id`, a D1 failure's `details`)."""
    assert b"Traceback" not in body and b'File "' not in body, body[:500]
    doc = json.loads(body)
    assert isinstance(doc, dict), doc
    assert set(doc) <= {"error", "status_code", "field", "hint", "id", "details"}, doc
    assert isinstance(doc["error"], str) and doc["error"], doc
    assert doc["status_code"] == status, (status, doc)
    if expected is not None:
        allowed = expected if isinstance(expected, tuple) else (expected,)
        assert status in allowed, (status, doc)
    assert status < 500 or status == 503, (status, doc)
    return doc


def sample_path(template: str, session_id: str = "absent-session", file_path: str = "f.txt") -> str:
    return template.replace("{id}", session_id).replace("{path}", file_path).replace("{schedule_id}", "sch_absent").replace(
        "{pid}", "999999").replace("{port}", "8000").replace("{proxy_path}", "x").replace(
        "{namespace}", "walk-ns").replace("{database}", "walk-db").replace("{bucket}", "walk-bucket").replace(
        "{key}", "walk-key")
