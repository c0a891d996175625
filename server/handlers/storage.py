"""ERA's storage proxy (``/api/storage/{kv,d1,r2}/...``, ``/api/resources/list``): parse,
call ``engine.storage``, answer in ERA's shapes. See ``era_kernel/storage``.

Who is calling decides whose storage is reached (the owner), never a name in the
request: the API key acts for its owner; code in a session shows a session token
(``Authorization: Bearer era_st.<session>.<mac>``, what ``era_storage`` sends from
``ERA_STORAGE_TOKEN``) and acts for the owner of that session; or it comes through the
listener the server opens inside the session's sandbox (``storage_listeners.py``), which
only that session can reach, and acts for its owner. The server's key never has to enter
a session.
"""

from __future__ import annotations

from typing import Any

from era_kernel.errors import BadRequest, Unauthorized
from era_kernel.storage.tokens import PREFIX as TOKEN_PREFIX

from ..apidoc import Op
from ..auth import bearer_token
from ..tenancy import check_storage
from .base import BaseHandler

LIST_QUERY = {"prefix": "only keys starting with this", "limit": "1-1000, default 100",
              "cursor": "from a previous listing: go on after its last key"}
TOKEN_NOTE = ("Authorised by the API key, or by a session's storage token (`ERA_STORAGE_TOKEN` in the session), "
              "which acts for the owner of that session. Writes past the owner's key's `storage_bytes`: 429.")


class StorageHandler(BaseHandler):
    owner: str | None = None
    _session_token: str | None = None

    def initialize(self, services: Any, auth: bool, session_id: str | None = None) -> None:
        """``session_id``: served on that session's in-sandbox listener (storage_listeners.py),
        where the connection itself says who calls."""
        super().initialize(services, auth)
        self.listener_session = session_id
        if session_id is not None:
            self.session_id = session_id  # logged with the request

    async def check_key(self) -> None:
        if self.listener_session is not None:
            return  # only that session's sandbox can reach its listener
        token = bearer_token(self.request.headers.get("Authorization"))
        if token is not None and token.startswith(TOKEN_PREFIX + "."):
            self._session_token = token  # checked in admit: the engine knows the sessions
            return
        await super().check_key()
        self.owner = self.tenant.owner  # the key's own namespaces (an admin key's too: no crossing)

    async def admit(self) -> None:
        await super().admit()
        if self.listener_session is not None:
            self.owner = await self.engine.storage.owner_for_session(self.listener_session)
            if self.owner is None:
                raise Unauthorized("this session no longer exists")
        elif self._session_token is not None:
            self.owner = await self.engine.storage.owner_for_token(self._session_token)
            if self.owner is None:
                raise Unauthorized("invalid storage token: not one of this server's sessions")

    @property
    def storage(self) -> Any:
        return self.engine.storage

    async def check_room(self) -> None:
        """Before a write: the owner's key has room under its ``storage_bytes``."""
        await check_storage(self.services, self.owner)

    def body_object(self) -> dict[str, Any]:
        body = self.json_body()
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", field="body")
        return body

    def list_args(self) -> dict[str, Any]:
        return {"prefix": self.query("prefix"), "limit": self.int_query("limit", 100, 1, 1000),
                "cursor": self.query("cursor")}


class KvListHandler(StorageHandler):
    API = {"get": Op("List a KV namespace's keys", response="KvList", query=LIST_QUERY, description=TOKEN_NOTE)}

    async def get(self, namespace: str) -> None:
        self.send_json(await self.storage.kv.list(self.owner, namespace, **self.list_args()))


class KvHandler(StorageHandler):
    API = {"get": Op("Read a KV value", response="KvValue", errors=(400, 404), description=TOKEN_NOTE),
           "put": Op("Write a KV value", body="KvPut", response="StorageSuccess", errors=(400, 413, 429)),
           "delete": Op("Delete a KV key (a missing key succeeds too)", response="StorageSuccess")}

    async def get(self, namespace: str, key: str) -> None:
        self.send_json(await self.storage.kv.get(self.owner, namespace, key))

    async def put(self, namespace: str, key: str) -> None:
        body = self.body_object()
        if "value" not in body:
            raise BadRequest("value is required", field="value")
        await self.check_room()
        self.send_json(await self.storage.kv.put(self.owner, namespace, key, body["value"], body.get("metadata")))

    async def delete(self, namespace: str, key: str) -> None:
        self.send_json(await self.storage.kv.delete(self.owner, namespace, key))


class D1Handler(StorageHandler):
    ROWS = False

    async def post(self, database: str) -> None:
        body = self.body_object()
        await self.check_room()
        self.send_json(await self.storage.d1.execute(self.owner, database, body.get("sql"), body.get("params"),
                                                     rows=self.ROWS))


class D1QueryHandler(D1Handler):
    ROWS = True
    API = {"post": Op("Run one SQL statement and return its rows", body="D1Body", response="D1Query",
                      errors=(400, 413, 422, 429),
                      description="One SQLite database per name. 422 when the statement runs past "
                                  "ERA_STORAGE_SQL_TIMEOUT (it is cancelled); 413 past ERA_STORAGE_SQL_MAX_BYTES or "
                                  "ERA_STORAGE_SQL_MAX_ROWS; 400 for ATTACH/DETACH, VACUUM, extensions and pragmas "
                                  "that change settings. " + TOKEN_NOTE)}


class D1ExecHandler(D1Handler):
    API = {"post": Op("Run one SQL statement (no rows returned)", body="D1Body", response="D1Exec",
                      errors=(400, 413, 422, 429), description="As `query`, without `results`.")}


class R2ListHandler(StorageHandler):
    API = {"get": Op("List a bucket's objects", response="R2List", query=LIST_QUERY, description=TOKEN_NOTE)}

    async def get(self, bucket: str) -> None:
        self.send_json(await self.storage.r2.list(self.owner, bucket, **self.list_args()))


class R2Handler(StorageHandler):
    API = {"get": Op("Read an object (base64 `content`)", response="R2Object", errors=(400, 404)),
           "put": Op("Write an object (base64 `content`)", body="R2Put", response="R2Stored", errors=(400, 413, 429),
                     description="Kept on the workspace store (ERA_WORKSPACE_URL: S3 when the server uses S3). "
                                 + TOKEN_NOTE),
           "delete": Op("Delete an object (a missing one succeeds too)", response="StorageSuccess")}

    async def get(self, bucket: str, key: str) -> None:
        self.send_json(await self.storage.r2.get(self.owner, bucket, key))

    async def put(self, bucket: str, key: str) -> None:
        body = self.body_object()
        data = self.storage.r2.decode(body.get("content"))
        await self.check_room()
        self.send_json(await self.storage.r2.put(self.owner, bucket, key, data, body.get("metadata"),
                                                 body.get("httpMetadata")))

    async def delete(self, bucket: str, key: str) -> None:
        self.send_json(await self.storage.r2.delete(self.owner, bucket, key))


class ResourcesHandler(StorageHandler):
    API = {"get": Op("ERA's storage registry: KV entries, objects and D1 tables, newest first",
                     response="ResourceList",
                     query={"type": "kv, d1, r2 or do", "namespace": "a namespace, bucket or database",
                            "key_prefix": "only keys (tables) starting with this", "limit": "1-1000, default 100",
                            "offset": "skip this many"}, description=TOKEN_NOTE)}

    async def get(self) -> None:
        self.send_json(await self.storage.registry.list(
            self.owner, type=self.query("type"), namespace=self.query("namespace"),
            key_prefix=self.query("key_prefix"), limit=self.int_query("limit", 100, 1, 1000),
            offset=self.int_query("offset", 0, 0, 10**9)))
