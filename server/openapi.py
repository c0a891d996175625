"""``/api/openapi.json``: built from the route table and the pydantic models.

Request schemas come from ``era_kernel.models`` (what the engine validates with), so the
document cannot drift from validation; responses from ``era_kernel.models.RunResult`` and
``server/schemas.py``.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from era_kernel import models

from . import schemas
from .apidoc import Op

RAW = {"bytes", "code", "sse", "websocket", "jupyter-websocket", "text"}
PARAMETERS = {
    "id": {"type": "string", "pattern": f"^{models.SESSION_ID_RE.pattern}$", "description": "session id"},
    "path": {"type": "string", "description": "file path inside the workspace, percent-encoded; may contain '/'"},
    "name": {"type": "string", "description": "kernelspec name, e.g. era-python-local"},
    "run_id": {"type": "string", "description": "run id: from a background run's 202, a result's run_id, "
                                                "the WebSocket's id or the stream's X-Era-Run-Id"},
    "schedule_id": {"type": "string", "description": "schedule id, `sch_<ms>_<8 hex>`"},
    "pid": {"type": "string", "description": "a process's pid in the session's sandbox (from .../processes)"},
    "port": {"type": "string", "description": "a TCP port inside the session's sandbox, 1-65535"},
    "proxy_path": {"type": "string", "description": "the path relayed to the app (may be empty, may contain '/')"},
    "namespace": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$", "description": "KV namespace"},
    "database": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$", "description": "D1 database"},
    "bucket": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$", "description": "R2 bucket"},
    "key": {"type": "string", "description": "KV or object key, percent-encoded; any text without control "
            "characters, may contain '/'"},
}


def _model(name: str) -> type[BaseModel]:
    found = getattr(schemas, name, None) or getattr(models, name, None)
    if not (isinstance(found, type) and issubclass(found, BaseModel)):
        raise LookupError(f"no model named {name}")
    return found


def _ops(routes) -> list[tuple[str, str, Op, bool]]:
    """(template, method, op, auth) for every method of every ``routes.Route``."""
    return [(route.template, method, op, route.auth) for route in routes for method, op in route.handler.API.items()]


def build_openapi(routes) -> dict[str, Any]:
    ops = _ops(routes)
    wanted: list[tuple[type[BaseModel], str]] = [(models.ErrorBody, "serialization")]
    for _, _, op, _ in ops:
        if op.body and op.body not in RAW:
            wanted.append((_model(op.body), "validation"))
        if op.response and op.response not in RAW:
            wanted.append((_model(op.response), "serialization"))
        wanted += [(_model(model), "serialization") for _, model in op.also]
    wanted.append((models.CodeBody, "validation"))
    wanted += [(m, "serialization") for m in schemas.WS_SERVER_MESSAGES]
    wanted += [(m, "validation") for m in schemas.WS_CLIENT_MESSAGES]
    wanted = list(dict.fromkeys(wanted))
    refs, top = models_json_schema(wanted, ref_template="#/components/schemas/{model}")

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return refs[(model, mode)]

    def one_of(models_: tuple, mode: str) -> dict[str, Any]:
        return {"oneOf": [ref(m, mode) for m in models_]}

    error_content = {"application/json": {"schema": ref(models.ErrorBody, "serialization")}}
    paths: dict[str, Any] = {}
    for template, method, op, auth in ops:
        is_api = template.startswith("/api/")
        params = [{"name": name, "in": "path", "required": True, "schema": PARAMETERS[name]}
                  for name in re.findall(r"\{(\w+)\}", template)]
        params += [{"name": name, "in": "query", "required": False, "schema": {"type": "string"},
                    "description": text} for name, text in op.query.items()]
        operation: dict[str, Any] = {
            "operationId": f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', template).strip('_')}",
            "summary": op.summary,
            "tags": list(op.tags) or [template.split("/")[2] if is_api else "server"],
            "responses": {},
        }
        if op.description:
            operation["description"] = op.description
        if params:
            operation["parameters"] = params
        if not auth:
            operation["security"] = []
        if op.body == "bytes":
            operation["requestBody"] = {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
        elif op.body == "code":
            operation["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": ref(models.CodeBody, "validation")},
                "text/plain": {"schema": {"type": "string"}}}}
        elif op.body:
            operation["requestBody"] = {"required": False, "content": {
                "application/json": {"schema": ref(_model(op.body), "validation")}}}
        responses = operation["responses"]
        description = HTTPStatus(op.status).phrase
        if op.response == "bytes":
            responses[str(op.status)] = {"description": "the file's bytes, as an attachment", "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
        elif op.response == "sse":
            responses[str(op.status)] = {"description": "Server-Sent Events; `event:` is the `type` field",
                                         "content": {"text/event-stream": {
                                             "schema": one_of(schemas.STREAM_EVENTS, "serialization")}}}
        elif op.response == "text":
            responses[str(op.status)] = {"description": "Prometheus text exposition format 0.0.4", "content": {
                "text/plain; version=0.0.4": {"schema": {"type": "string"}}}}
        elif op.response == "websocket":
            responses["101"] = {"description": "Switching Protocols (WebSocket)"}
            operation["x-websocket"] = {
                "client-messages": one_of(schemas.WS_CLIENT_MESSAGES, "validation"),
                "server-messages": one_of(schemas.WS_SERVER_MESSAGES, "serialization"),
            }
        elif op.response == "jupyter-websocket":
            responses["101"] = {"description": "Switching Protocols (WebSocket)"}
            operation["x-websocket"] = {"protocol": "Jupyter messaging, JSON frames with a `channel` field "
                                                    "(binary frames for messages with buffers)"}
        elif op.response:
            responses[str(op.status)] = {"description": description, "content": {
                op.media_type: {"schema": ref(_model(op.response), "serialization")}}}
        else:
            responses[str(op.status)] = {"description": description}
        for status, model in op.also:
            responses[str(status)] = {"description": HTTPStatus(status).phrase, "content": {
                "application/json": {"schema": ref(_model(model), "serialization")}}}
        codes = set(op.errors)
        if auth:
            codes.add(401)
        if is_api:
            codes.add(503)
        if op.body:
            codes |= {400, 413}
        for code in sorted(codes):
            responses[str(code)] = {"description": HTTPStatus(code).phrase, "content": error_content}
        paths.setdefault(template, {})[method] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "ERA Kernel", "version": "1",
                 "description": "Code execution in stateful sessions on Jupyter kernels; "
                                "compatible with the ERA agent's REST API, plus extensions."},
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "ERA_API_KEY, when the server has one"}},
        },
        "security": [{"bearer": []}],
    }
