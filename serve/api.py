"""The HTTP API: FastAPI routes under /api/v1, plus /healthz, /readyz and /metrics.

Lists and gets read the store; mutations call the controller. Lists take ``limit``, ``cursor``,
``sort`` (a field, ``-field`` for descending) and field filters, and return
``{"items": [...], "next_cursor": ...}``.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import Body, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StringConstraints

from novacron.errors import InvalidRequest, NotFound
from novacron.model import VM, Host, HostCreate, VMCreate
from novacron.states import HostState, VMState
from novacron.store import Record
from serve import errors, metrics
from serve.backend import Backend

API = "/api/v1"
MAX_LIMIT = 1000
VM_SORTS = {"id": "key", "name": "name", "state": "state", "host": "host",
            "created_at": "created_at"}
HOST_SORTS = {"name": "key", "state": "state", "driver": "driver"}


class ActionBody(BaseModel):
    """Options of a VM action (``force`` applies to stop)."""

    model_config = ConfigDict(extra="forbid")
    force: bool = False


class SnapshotCreate(BaseModel):
    """``POST /api/v1/vms/{id}/snapshots``."""

    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]


class Page(BaseModel):
    """One page of a listing."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def _item(record: Record) -> dict[str, Any]:
    return {**record.data, "revision": record.revision}


def _page_response(items: list[str], next_cursor: str | None) -> Response:
    """A list response assembled from stored JSON text: nothing is parsed or re-validated."""
    cursor = "null" if next_cursor is None else f'"{next_cursor}"'
    body = f'{{"items":[{",".join(items)}],"next_cursor":{cursor}}}'
    return Response(content=body, media_type="application/json")


def _sort(sort: str | None, allowed: dict[str, str]) -> tuple[str, bool]:
    if not sort:
        return "key", False
    descending = sort.startswith("-")
    field = sort.lstrip("-")
    if field not in allowed:
        raise InvalidRequest(f"cannot sort by {field!r}; use one of {', '.join(allowed)}",
                             details={"sort": sort})
    return allowed[field], descending


def backend_of(request: Request) -> Backend:
    backend: Backend = request.app.state.backend
    return backend


def build_app() -> FastAPI:
    """The FastAPI application; ``app.state.backend`` must be set before it serves."""
    app = FastAPI(title="NovaCron", version="0.1.0",
                  description="One control plane for virtual machines on KVM/QEMU and clouds.")
    errors.install(app)
    app.add_middleware(metrics.RequestMetrics)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        backend = backend_of(request)
        if await backend.ready():
            return JSONResponse({"status": "ready", "revision": backend.store.head_revision()})
        return errors.error_response(503, "unavailable", "the controller is not answering")

    @app.get("/metrics", tags=["health"])
    async def prometheus(request: Request) -> Response:
        backend = backend_of(request)
        return metrics.render(backend.store, await backend.call("all_host_stats"))

    # -- hosts ------------------------------------------------------------------------------
    @app.get(f"{API}/hosts", tags=["hosts"], response_model=Page)
    async def list_hosts(request: Request, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
                         cursor: str | None = None, sort: str | None = None,
                         state: HostState | None = None, driver: str | None = None) -> Response:
        field, desc = _sort(sort, HOST_SORTS)
        where = {k: v for k, v in (("state", state), ("driver", driver)) if v is not None}
        return _page_response(*backend_of(request).store.page_json(
            "host", where=where, sort=field, descending=desc, limit=limit, cursor=cursor))

    @app.post(f"{API}/hosts", status_code=201, tags=["hosts"])
    async def register_host(request: Request, body: HostCreate) -> Host:
        host: Host = await backend_of(request).call("register_host", body)
        return host

    @app.get(f"{API}/hosts/{{name}}", tags=["hosts"])
    async def get_host(request: Request, name: str) -> dict[str, Any]:
        record = backend_of(request).store.get("host", name)
        if record is None:
            raise NotFound(f"no host named {name!r}", details={"host": name})
        return _item(record)

    @app.post(f"{API}/hosts/{{name}}/maintenance", tags=["hosts"])
    async def host_maintenance(request: Request, name: str) -> Host:
        host: Host = await backend_of(request).call("set_host_state", name,
                                                    HostState.MAINTENANCE)
        return host

    @app.post(f"{API}/hosts/{{name}}/activate", tags=["hosts"])
    async def host_activate(request: Request, name: str) -> Host:
        host: Host = await backend_of(request).call("set_host_state", name, HostState.UP)
        return host

    @app.delete(f"{API}/hosts/{{name}}", status_code=204, tags=["hosts"])
    async def delete_host(request: Request, name: str) -> Response:
        await backend_of(request).call("delete_host", name)
        return Response(status_code=204)

    # -- VMs --------------------------------------------------------------------------------
    @app.get(f"{API}/vms", tags=["vms"], response_model=Page)
    async def list_vms(request: Request, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
                       cursor: str | None = None, sort: str | None = None,
                       state: VMState | None = None, host: str | None = None,
                       name: str | None = None) -> Response:
        field, desc = _sort(sort, VM_SORTS)
        where = {k: v for k, v in (("state", state), ("host", host), ("name", name))
                 if v is not None}
        return _page_response(*backend_of(request).store.page_json(
            "vm", where=where, sort=field, descending=desc, limit=limit, cursor=cursor))

    @app.post(f"{API}/vms", status_code=202, tags=["vms"])
    async def create_vm(request: Request, body: VMCreate,
                        idempotency_key: Annotated[str | None, Header(max_length=200)] = None
                        ) -> VM:
        vm: VM = await backend_of(request).call(
            "create_vm", body, request_id=idempotency_key or uuid.uuid4().hex)
        return vm

    @app.get(f"{API}/vms/{{vm_id}}", tags=["vms"])
    async def get_vm(request: Request, vm_id: str) -> dict[str, Any]:
        record = backend_of(request).store.get("vm", vm_id)
        if record is None:
            raise NotFound(f"no VM with id {vm_id!r}", details={"vm": vm_id})
        return _item(record)

    @app.delete(f"{API}/vms/{{vm_id}}", status_code=202, tags=["vms"])
    async def delete_vm(request: Request, vm_id: str) -> VM:
        vm: VM = await backend_of(request).call("delete_vm", vm_id)
        return vm

    # -- snapshots --------------------------------------------------------------------------
    @app.get(f"{API}/vms/{{vm_id}}/snapshots", tags=["snapshots"])
    async def list_snapshots(request: Request, vm_id: str) -> dict[str, Any]:
        items = await backend_of(request).call("snapshot", vm_id, "list")
        return {"items": items, "next_cursor": None}

    @app.post(f"{API}/vms/{{vm_id}}/snapshots", status_code=201, tags=["snapshots"])
    async def create_snapshot(request: Request, vm_id: str,
                              body: SnapshotCreate) -> dict[str, Any]:
        snapshot: dict[str, Any] = await backend_of(request).call("snapshot", vm_id, "create",
                                                                  body.name)
        return snapshot

    @app.post(f"{API}/vms/{{vm_id}}/snapshots/{{name}}/revert", status_code=202,
              tags=["snapshots"])
    async def revert_snapshot(request: Request, vm_id: str, name: str) -> dict[str, Any]:
        observed: dict[str, Any] = await backend_of(request).call("snapshot", vm_id, "revert",
                                                                  name)
        return observed

    @app.delete(f"{API}/vms/{{vm_id}}/snapshots/{{name}}", status_code=204, tags=["snapshots"])
    async def delete_snapshot(request: Request, vm_id: str, name: str) -> Response:
        await backend_of(request).call("snapshot", vm_id, "delete", name)
        return Response(status_code=204)

    @app.post(f"{API}/vms/{{vm_id}}/{{action}}", status_code=202, tags=["vms"])
    async def vm_action(request: Request, vm_id: str, action: str,
                        body: Annotated[ActionBody | None, Body()] = None) -> VM:
        if action not in ("start", "stop", "reboot", "pause", "resume"):
            raise NotFound(f"no VM action {action!r}; use start, stop, reboot, pause or resume",
                           details={"action": action})
        force = body.force if body else False
        vm: VM = await backend_of(request).call("vm_action", vm_id, action, force=force)
        return vm

    # -- events -----------------------------------------------------------------------------
    @app.get(f"{API}/events", tags=["events"])
    async def events(request: Request, since: Annotated[int, Query(ge=0)] = 0,
                     limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100
                     ) -> dict[str, Any]:
        batch = backend_of(request).store.events(since, limit=limit, kinds=["vm", "host"])
        return {"items": [{"revision": ev.revision, "kind": ev.kind, "key": ev.key, "op": ev.op,
                           "time": ev.time, "data": ev.data} for ev in batch],
                "next": batch[-1].revision if batch else since}

    return app
