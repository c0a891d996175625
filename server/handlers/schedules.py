"""Schedule routes: a session's cron-timed background runs (era_kernel/engine/schedules.py).
Each method: parse, call the engine, frame."""

from __future__ import annotations

from ..apidoc import Op
from .base import BaseHandler

FIRINGS = ("Each firing is a background run (`source: \"schedule\"`, with `schedule_id` and `slot`) in "
           "`GET .../runs`. A firing whose previous run is still queued or running, or whose session's run "
           "queue is full, is skipped and noted in `last_skipped`; a slot missed while no server ran fires once "
           "at start (`ERA_SCHEDULE_CATCH_UP`).")


class SchedulesHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {
        "get": Op("List the session's schedules, oldest first", response="ScheduleList", errors=(400, 404)),
        "post": Op("Schedule background runs on a cron expression", body="ScheduleRequest",
                   response="ScheduleDocument", status=201, errors=(400, 404, 413),
                   description="Without `code`, each firing runs the session's stored program (`PUT .../code`), "
                               "read when it runs. An invalid `cron` or `timezone` is a 400 naming the field. "
                               + FIRINGS),
    }

    async def get(self, sid: str) -> None:
        schedules = await self.engine.list_schedules(sid)
        self.send_json({"session_id": sid, "schedules": schedules, "count": len(schedules)})

    async def post(self, sid: str) -> None:
        doc = await self.engine.create_schedule(sid, self.json_body())
        self.set_header("Location", f"/api/sessions/{sid}/schedules/{doc['id']}")
        self.send_json(doc, 201)


class ScheduleHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {
        "get": Op("Get a schedule: its next slot, last firing and last skipped firing", response="ScheduleDocument",
                  errors=(400, 404)),
        "delete": Op("Delete a schedule (its runs stay in the history)", response="Deleted", errors=(400, 404),
                     description="A run it already started goes on; nothing fires after."),
    }

    async def get(self, sid: str, schedule_id: str) -> None:
        self.send_json(await self.engine.get_schedule(sid, schedule_id))

    async def delete(self, sid: str, schedule_id: str) -> None:
        await self.engine.delete_schedule(sid, schedule_id)
        self.send_json({"deleted": schedule_id})
