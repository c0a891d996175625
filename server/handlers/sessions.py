"""Session routes: create/list/bulk delete, one session, duplicate, stored code, history,
session events, notebook export, interrupt and restart. Each method: parse, call the engine, frame."""

from __future__ import annotations

from era_kernel.engine.results import utc_now
from era_kernel.errors import BadRequest

from ..apidoc import Op
from ..tenancy import check_kernel, new_session
from .base import BaseHandler, dumps

SESSION_ERRORS = (400, 404)


class SessionsHandler(BaseHandler):
    API = {
        "get": Op("List sessions, oldest first, a page at a time", response="SessionList",
                  query={"limit": "most sessions to return, 1 to `ERA_LIST_MAX` (default: `ERA_LIST_MAX`)",
                         "cursor": "the `next_cursor` of the previous page"},
                  description="Without `limit` or `cursor` the answer is ERA's `{sessions, count}`, every "
                              "session up to `ERA_LIST_MAX` (and `ERA_LIST_MAX_BYTES` of JSON); past that it adds "
                              "`truncated: true` and `next_cursor`. With either, it always has `next_cursor` "
                              "(null on the last page). Cursors stay valid while sessions are created or deleted."),
        "post": Op("Create a session", body="CreateSession", response="SessionDocument", status=201,
                   errors=(400, 409, 413, 422, 429),
                   description="`id` or `session_id` names the session; auto `sess_<ms>_<random>` otherwise. "
                               "The kernel starts in the background."),
        "delete": Op("Delete sessions in bulk", body="BulkDelete", response="BulkDeleted",
                     query={"prefix": "only ids starting with this"},
                     description="All sessions when neither `?prefix=` nor body `ids`/`prefix` is given."),
    }

    async def get(self) -> None:
        limit = self.int_query("limit", None, 1, self.services.settings["ERA_LIST_MAX"])
        cursor = self.query("cursor")
        page = await self.engine.list(limit=limit, cursor=cursor, owner=self.owner_filter)
        body = {"sessions": page, "count": len(page)}
        if limit is not None or cursor is not None:  # a paging client: always tell it where to go on
            body["next_cursor"] = page.next_cursor
        elif page.next_cursor is not None:  # ERA's shape, plus word that the list was cut
            body.update(truncated=True, next_cursor=page.next_cursor)
        self.send_json(body)

    async def post(self) -> None:
        body = self.json_body()
        async with new_session(self.services, self.tenant):
            doc = await self.engine.create(body, owner=self.tenant.owner)
        self.session_id = doc.get("id")
        self.set_header("Location", f"/api/sessions/{doc.get('id')}")
        self.send_json(doc, 201)

    async def delete(self) -> None:
        from era_kernel import models

        req = models.parse(models.BulkDelete, self.json_body())
        prefix = self.query("prefix")
        if prefix is not None and req.prefix is not None and prefix != req.prefix:
            raise BadRequest("'prefix' given in both the query and the body, with different values", field="prefix")
        deleted = await self.engine.delete_many(ids=req.ids, prefix=prefix if prefix is not None else req.prefix,
                                                owner=self.owner_filter)
        # ERA's answer, and ours before it (`deleted`, `count`) for older clients.
        self.send_json({"success": True, "deleted_count": len(deleted), "deleted_sessions": deleted,
                        "deleted_at": utc_now(), "deleted": deleted, "count": len(deleted)})


class SessionHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {
        "get": Op("Get a session", response="SessionDocument", errors=SESSION_ERRORS),
        "patch": Op("Update metadata, data, default_timeout, allowInternetAccess, allowPublicAccess, typecheck, env",
                    body="PatchSession", response="Patched", errors=(400, 404, 413),
                    description="ERA's answer: `{success, id, metadata: <the session document>, updated_at}`. "
                                "Network, env and typecheck changes take effect at the next kernel start."),
        "delete": Op("Delete a session: kernel, files, metadata, history", response="Deleted",
                     errors=SESSION_ERRORS),
    }

    async def get(self, sid: str) -> None:
        self.send_json(await self.engine.get(sid))

    async def patch(self, sid: str) -> None:
        doc = await self.engine.patch(sid, self.json_body())
        self.send_json({"success": True, "id": sid, "metadata": doc, "updated_at": utc_now()})

    async def delete(self, sid: str) -> None:
        await self.engine.delete(sid)  # its sockets close on the engine's SessionDeleted (services.py)
        self.send_json({"success": True, "id": sid, "deleted_at": utc_now(), "deleted": sid})


class DuplicateHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Duplicate a session (data, files, language, metadata, setup; not history)",
                      body="DuplicateRequest", response="SessionDocument", status=201,
                      errors=(400, 404, 409, 413, 429))}

    async def post(self, sid: str) -> None:
        body = self.json_body()
        async with new_session(self.services, self.tenant):
            doc = await self.engine.duplicate(sid, body, owner=self.tenant.owner)
        self.set_header("Location", f"/api/sessions/{doc.get('id')}")
        self.send_json(doc, 201)


class CodeHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {
        "get": Op("Get the stored default program", response="StoredCode", errors=SESSION_ERRORS,
                  description="404 `{error: \"no code stored\", hint}` when there is none."),
        "put": Op("Store the default program (`run` with no `code` runs it)", body="code",
                  response="CodeStored", errors=(400, 404, 413),
                  description="JSON `{\"code\": ..., \"description\"?: ...}`, or the program itself as `text/plain`. "
                              "As in ERA it is kept in the session's data: `data.code`, `data.code_description`, "
                              "`data.code_updated_at`."),
    }

    async def get(self, sid: str) -> None:
        self.send_json({"session_id": sid, **await self.engine.get_code(sid)})

    async def put(self, sid: str) -> None:
        content_type = self.request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type == "text/plain":
            try:
                body = {"code": self.body_bytes().decode("utf-8")}
            except UnicodeDecodeError:
                raise BadRequest("request body is not valid UTF-8") from None
        else:
            body = self.json_body()
            if not isinstance(body, dict):
                raise BadRequest("request body must be a JSON object with a 'code' field", field="code")
            if "code" not in body:
                raise BadRequest("code field required", field="code")
        stored = await self.engine.set_code(sid, body)
        self.send_json({"success": True, "session_id": sid, **stored})


class RunsHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("Run history, oldest first", response="RunList", errors=SESSION_ERRORS,
                     query={"limit": "most recent runs to return, 1-10000 (default 100)"})}

    async def get(self, sid: str) -> None:
        limit = self.int_query("limit", 100, 1, 10_000)
        runs = await self.engine.runs(sid, limit=limit)
        self.send_json({"session_id": sid, "runs": runs, "count": len(runs)})


class SessionEventsHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("Session events: why its kernels started and went away, and how its setup ended",
                     response="SessionEvents", errors=SESSION_ERRORS,
                     query={"after": "return events with id greater than this (default 0): the previous answer's "
                                     "`last_id`",
                            "limit": "most events to return, 1-1000 (default 100)"},
                     description="Types: kernel_started, kernel_culled (idle past `ERA_KERNEL_IDLE_TIMEOUT`), "
                                 "kernel_evicted (least recently used, under `ERA_MAX_KERNELS`), kernel_died "
                                 "(out of memory, exit status), kernel_restarted (a timeout whose interrupt did "
                                 "not take, or a request), kernel_stopped (settings changed, server shutdown), "
                                 "setup_completed, setup_failed. Each has `reason`, `at` and `message`. Kept "
                                 "across restarts; the newest 1000 per session. The session document's "
                                 "`kernel.last_exit` is the last event that ended a kernel.")}

    async def get(self, sid: str) -> None:
        after = self.int_query("after", 0, 0, 2**62) or 0
        limit = self.int_query("limit", 100, 1, 1000)
        events = await self.engine.session_events(sid, after=after, limit=limit)
        self.send_json({"session_id": sid, "events": events, "last_id": events[-1]["id"] if events else after})


class NotebookHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"get": Op("The run history as a Jupyter notebook (nbformat 4)", response="Notebook",
                     media_type="application/x-ipynb+json",
                     errors=SESSION_ERRORS)}

    async def get(self, sid: str) -> None:
        notebook = await self.engine.notebook(sid)
        self.set_header("Content-Type", "application/x-ipynb+json")
        self.set_header("Content-Disposition", f'attachment; filename="{sid}.ipynb"')
        self.finish(dumps(notebook))


class InterruptHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Interrupt the current run (KeyboardInterrupt / SIGINT)", response="Interrupted",
                      errors=SESSION_ERRORS,
                      description="Runs queued behind it run next. A run still waiting for its kernel's start "
                                  "or package setup ends at once, unrun, as an interrupted cell does; the start "
                                  "goes on. With no run, nothing happens (a starting kernel is left alone).")}

    async def post(self, sid: str) -> None:
        await self.engine.interrupt(sid)
        self.send_json({"session_id": sid, "interrupted": True})


class RestartHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Restart the kernel: variables are lost; files and data stay", response="Restarted",
                      errors=(400, 404, 429))}

    async def post(self, sid: str) -> None:
        await check_kernel(self.services, self.tenant, None)
        await self.engine.restart(sid)
        self.send_json({"session_id": sid, "restarted": True})
