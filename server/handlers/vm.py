"""ERA's local-agent routes (``/api/vm``, ``/api/vms``), mapped onto sessions.

ERA's agent hands out microVMs: create one with a language and limits, run shell
commands in it, stop it, delete it. Here a VM is a session: its id is a session id (the
session routes work on it too), ``network_mode`` is ``allowInternetAccess``, ``persist``
is ``persistent``, ``cpu_count`` and ``memory_mib`` are the session's ``limits``, and a
command runs in the session's sandbox (engine ``run_command``). The answers carry the
fields ERA's agent documents (``era-agent/HTTP_API.md``); each handler only frames.
"""

from __future__ import annotations

import time
from typing import Any

from era_kernel.errors import BadRequest

from ..apidoc import Op
from ..tenancy import check_run, new_session
from .base import BaseHandler

VM_ERRORS = (400, 404)
NETWORK_MODES = {"none": False, "full": True}  # ERA's agent: none, or full network (what its setup VMs use)


def vm_document(doc: dict[str, Any], settings: Any, enforced: dict[str, bool]) -> dict[str, Any]:
    """A session document in the shape of ERA's VM, the session's own fields beside it."""
    limits = doc.get("limits") or {}
    docker = doc.get("provisioner") == "docker"
    memory = limits.get("memory_mib") or settings["ERA_DOCKER_MEMORY" if docker else "ERA_KERNEL_MEMORY"] // 1024**2
    cpus = limits.get("cpu_count") or (settings["ERA_DOCKER_CPUS"] if docker else None)
    kernel = doc.get("kernel") or {}
    # No kernel yet after a create is a VM starting; no kernel after one ended (stop, cull,
    # server restart) is a stopped VM, which its next run starts again.
    stopped = kernel.get("state") == "dead" or (kernel.get("state") == "none" and kernel.get("last_exit"))
    return {
        "id": doc["id"], "language": doc["language"],
        "rootfs_image": f"{settings['ERA_DOCKER_IMAGE_PREFIX']}/{doc['language']}" if docker else "local sandbox",
        "cpu_count": cpus, "memory_mib": memory,
        "network_mode": "full" if doc.get("allowInternetAccess") else "none", "persist": doc.get("persistent"),
        "status": "stopped" if stopped else "running",
        "created_at": doc.get("created_at"), "last_run_at": doc.get("last_run_at"),
        "limits_enforced": enforced,  # which of cpu_count and memory_mib this provisioner holds
        "session": doc,
    }


async def framed(handler: BaseHandler, doc: dict[str, Any]) -> dict[str, Any]:
    enforced = await handler.engine.limits_enforced(doc.get("provisioner", "local"))
    return vm_document(doc, handler.services.settings, enforced)


def session_body(body: Any) -> dict[str, Any]:
    """ERA's create-VM body -> a create-session body (400 naming ERA's field)."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", field="body")
    mode = body.get("network_mode", "none")
    if not isinstance(mode, str) or mode not in NETWORK_MODES:  # a list or object is unhashable: not a 500
        raise BadRequest(f"network_mode must be one of {', '.join(NETWORK_MODES)} (got {str(mode)[:40]!r})",
                         field="network_mode")
    language = body.get("language", "python")
    out: dict[str, Any] = {
        "language": language, "allowInternetAccess": NETWORK_MODES[mode], "persistent": body.get("persist", False),
        "limits": {key: body[key] for key in ("memory_mib", "cpu_count") if body.get(key) is not None},
    }
    # ERA's ids: <language>-<nanoseconds>; a caller may still choose one.
    out["id"] = body.get("id") or f"{language if isinstance(language, str) else 'vm'}-{time.time_ns()}"
    for key in ("env", "setup", "metadata", "provisioner"):
        if key in body:
            out[key] = body[key]
    return out


class VmsHandler(BaseHandler):
    API = {
        "post": Op("Create a VM (ERA's local agent): a session with these limits", body="CreateVm",
                   response="Vm", status=201, errors=(400, 409, 413, 422, 429),
                   description="`network_mode` `none` or `full` (its allowInternetAccess), `persist` (persistent), "
                               "`cpu_count` and `memory_mib` (its limits: memory on both provisioners, CPUs in "
                               "containers; `limits_enforced` says which)."),
    }

    async def post(self) -> None:
        body = session_body(self.json_body())
        async with new_session(self.services, self.tenant):
            doc = await self.engine.create(body, owner=self.tenant.owner)
        self.session_id = doc["id"]
        self.send_json(await framed(self, doc), 201)


class VmListHandler(BaseHandler):
    API = {"get": Op("List VMs (ERA's local agent): every session, in ERA's VM shape", response="VmList")}

    async def get(self) -> None:
        page = await self.engine.list(owner=self.owner_filter)
        # Once per provisioner, not per session: it asks the host (in a thread) what holds.
        enforced = {p: await self.engine.limits_enforced(p) for p in {doc.get("provisioner", "local") for doc in page}}
        vms = [{key: vm[key] for key in ("id", "language", "status", "cpu_count", "memory_mib", "created_at")}
               for vm in (vm_document(doc, self.services.settings, enforced[doc.get("provisioner", "local")])
                          for doc in page)]
        self.send_json({"vms": vms, "count": len(vms)})


class VmHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {
        "get": Op("Get a VM (ERA's local agent)", response="Vm", errors=VM_ERRORS),
        "delete": Op("Delete a VM (ERA's local agent): the session, its kernel and files", response="VmDone",
                     errors=VM_ERRORS),
    }

    async def get(self, sid: str) -> None:
        self.send_json(await framed(self, await self.engine.get(sid)))

    async def delete(self, sid: str) -> None:
        await self.engine.delete(sid)
        self.send_json({"status": "deleted", "vm_id": sid, "message": "VM cleaned successfully"})


class VmStopHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Stop a VM (ERA's local agent): its kernel stops, its files stay; the next run starts one",
                      response="VmDone", errors=VM_ERRORS)}

    async def post(self, sid: str) -> None:
        await self.engine.stop_kernel(sid)
        self.send_json({"status": "stopped", "vm_id": sid, "message": "VM stopped successfully"})


class VmRunHandler(BaseHandler):
    SESSION_ROUTE = True
    API = {"post": Op("Run a shell command in a VM (ERA's local agent)", body="CommandRequest", response="CommandResult",
                      errors=(400, 404, 409, 429, 503),
                      description="`command` runs with `bash -c` inside the session's sandbox (its workspace as "
                                  "the working directory, its /tmp, network and limits); `timeout` in seconds "
                                  "(default the session's default_timeout) ends it with exit code 124.")}

    async def post(self, sid: str) -> None:
        body = self.json_body()
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object with a 'command' field", field="command")
        await check_run(self.services, self.tenant, sid)
        self.send_json(await self.engine.run_command(sid, body))
