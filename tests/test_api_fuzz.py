"""schemathesis against the live server's own OpenAPI document (``/api/openapi.json``):
for every documented operation, requests generated from the schema (valid and invalid
bodies, odd path parameters and query strings), each answer checked for what a client
relies on: no 5xx, a status code and content type the document lists, a body that
matches the documented schema, and never a Python traceback.

Bounded for CI (about a minute): a few examples per operation, derandomized so a run is
reproducible (a failure names the case; `st run` with more examples explores further,
see README "API fuzzing"). Routes that upgrade to a WebSocket or stream until closed are
left out: schemathesis speaks neither, and they have their own tests."""

from __future__ import annotations

import os

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from tests.support.era_server import ServerProcess

# WebSockets (ws, terminal, Jupyter channels), Server-Sent Event streams, and MCP's
# streamable transport (its GET holds an event stream open).
STREAMING = r"(/ws|/terminal|/channels|/stream|/events|^/mcp)$"
EXAMPLES = int(os.environ.get("ERA_FUZZ_EXAMPLES", "8"))  # per operation; more for a deeper run by hand
CHECKS = (not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance)


@pytest.fixture(scope="module")
def server():
    # Its own server: the fuzzer makes and deletes sessions, kernels and files at random.
    srv = ServerProcess(env={"ERA_POOL_SIZE": "0"}).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    loaded = schemathesis.openapi.from_url(f"http://127.0.0.1:{server.port}/api/openapi.json")
    return loaded.exclude(path_regex=STREAMING)


def test_api_answers_what_its_document_says(api_schema, server):
    """One Hypothesis run per operation (schemathesis' pytest plugin cannot take a schema
    from a module fixture on this pytest), every operation's failures gathered so one
    run reports them all, each with the request that provoked it."""
    failures: list[str] = []
    operations = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        operations += 1

        # Valid requests and invalid ones (a wrong type, a missing field, an extra one).
        strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                             operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=strategy)
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def answers_as_documented(case):
            response = case.call(timeout=60)
            body = response.content or b""
            assert b"Traceback" not in body and b'File "/' not in body, body[:500]
            case.validate_response(response, checks=CHECKS)

        try:
            answers_as_documented()
        except Exception as exc:  # noqa: BLE001 - every operation's failure is reported below
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
    assert operations > 40, f"only {operations} operations documented"


@pytest.mark.parametrize("mode", [{}, [], None, 3, "half"])
def test_vm_network_mode_of_any_type_is_a_400(server, mode):
    """Found by the fuzzer (POST /api/vm answered an object here with a 500): kept as a
    case of its own, since a bounded run may not draw it again."""
    from tests.support.api_errors import assert_error_shape

    status, body = server.request("POST", "/api/vm", {"language": "python", "network_mode": mode})
    assert assert_error_shape(status, body, 400)["field"] == "network_mode"
