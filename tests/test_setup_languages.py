"""npm packages from `setup` in node and typescript sessions, on both provisioners
(real npm registry): the setup runs in the session's own image or sandbox."""

from __future__ import annotations

import pytest

from .conftest import both_provisioners

pytestmark = both_provisioners


@pytest.mark.parametrize("language, code", [
    ("node", "const ms = require('ms'); console.log(ms('2 days'))"),
    ("typescript", "import ms from 'ms'; console.log(ms('2 days'))"),
])
async def test_npm_setup_is_importable(engine, language, code):
    doc = await engine.create({"language": language, "setup": {"npm": ["ms@2.1.3"]}})
    r = await engine.run(doc["id"], {"code": code, "timeout": 240})
    final = await engine.get(doc["id"])
    assert final["setup_status"] == "completed", final["setup_result"]
    assert r["exit_code"] == 0 and r["stdout"] == "172800000\n", r
