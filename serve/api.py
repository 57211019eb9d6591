"""The HTTP API: FastAPI routes under /api/v1, plus /healthz, /readyz and /metrics.

Every route under /api/v1 and /metrics needs credentials (``Authorization: Bearer <token>`` or a
session cookie): one router-level dependency authenticates each request, so a route added later
is covered without thinking about it. Only /healthz, /readyz, /api/v1/login, TOTP enrolment
(which takes the password) and the OpenAPI documentation are public.

Lists and gets read the store and show only the tenants the caller may read; mutations go to the
controller, which authorizes and audits them. Lists take ``limit``, ``cursor``, ``sort`` (a field,
``-field`` for descending) and field filters, and return ``{"items": [...], "next_cursor": ...}``.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from novacron.access import Caller, visible
from novacron.auth import Principal, Resource, Verb
from novacron.auth.authn import SESSION_COOKIE
from novacron.errors import InvalidRequest, NotFound
from novacron.model import VM, Host, HostCreate, Migration, MigrationCreate, VMCreate
from novacron.secured import no_host, no_vm
from novacron.states import HostState, VMState
from serve import errors, metrics
from serve.backend import Backend

API = "/api/v1"
MAX_LIMIT = 1000
VM_SORTS = {"id": "key", "name": "name", "state": "state", "host": "host",
            "created_at": "created_at"}
HOST_SORTS = {"name": "key", "state": "state", "driver": "driver"}

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]
TenantName = Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,62})$")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ActionBody(_Body):
    """Options of a VM action (``force`` applies to stop)."""

    force: bool = False


class SnapshotCreate(_Body):
    name: Name


class TenantCreate(_Body):
    name: Name
    quota: dict[str, int | None] = Field(default_factory=dict)
    require_mfa: bool = False


class TenantUpdate(_Body):
    quota: dict[str, int | None] | None = None
    require_mfa: bool | None = None


class TokenCreate(_Body):
    name: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    role: Name
    tenant: TenantName | None = None
    ttl_s: float = Field(default=90 * 86400, gt=0)


class UserCreate(_Body):
    name: Name
    password: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    tenant: Name | None = None


class Login(_Body):
    tenant: Name
    name: Name
    password: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    totp: Annotated[str, StringConstraints(pattern=r"^[0-9]{6,8}$")] | None = None


class TotpConfirm(_Body):
    password: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    code: Annotated[str, StringConstraints(pattern=r"^[0-9]{6,8}$")] | None = None


class RolePut(_Body):
    permissions: list[Annotated[str, StringConstraints(max_length=64)]] = Field(max_length=256)
    description: Annotated[str, StringConstraints(max_length=1024)] = ""


class BindingBody(_Body):
    principal: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    role: Name
    tenant: TenantName


class PlanBody(_Body):
    vms: list[VMCreate] = Field(min_length=1, max_length=10_000)


class RebalanceBody(_Body):
    """``dry_run`` (the default): only propose; false: start the proposed migrations."""

    dry_run: bool = True


class Page(BaseModel):
    """One page of a listing."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def _page_response(items: list[str], next_cursor: str | None) -> Response:
    """A list response assembled from stored JSON text: nothing is parsed or re-validated."""
    cursor = "null" if next_cursor is None else f'"{next_cursor}"'
    body = f'{{"items":[{",".join(items)}],"next_cursor":{cursor}}}'
    return Response(content=body, media_type="application/json")


def _items(items: list[Any]) -> dict[str, Any]:
    return {"items": items, "next_cursor": None}


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


def caller_of(request: Request,
              authorization: Annotated[str | None, Header(max_length=8192)] = None,
              x_request_id: Annotated[str | None, Header(max_length=128)] = None) -> Caller:
    """The request's credentials and id."""
    return Caller(authorization=authorization, session=request.cookies.get(SESSION_COOKIE),
                  request_id=x_request_id or uuid.uuid4().hex)


CallerDep = Annotated[Caller, Depends(caller_of)]


def authenticated(request: Request, caller: CallerDep) -> Principal:
    """The router-level dependency: every protected route authenticates its caller."""
    principal = backend_of(request).gate.principal(caller)
    request.state.principal = principal
    return principal


def _principal(request: Request) -> Principal:
    principal: Principal = request.state.principal
    return principal


def build_app() -> FastAPI:
    """The FastAPI application; ``app.state.backend`` must be set before it serves."""
    app = FastAPI(title="NovaCron", version="0.1.0",
                  description="One control plane for virtual machines on KVM/QEMU and clouds. "
                              "Authenticate with `Authorization: Bearer <token>`.")
    errors.install(app)
    app.add_middleware(metrics.RequestMetrics)
    app.add_middleware(errors.BodyLimit)
    public = APIRouter()
    api = APIRouter(dependencies=[Depends(authenticated)])

    # -- health (public) --------------------------------------------------------------------
    @public.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @public.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        backend = backend_of(request)
        if await backend.ready():
            return JSONResponse({"status": "ready", "revision": backend.store.head_revision()})
        return errors.error_response(503, "unavailable", "the controller is not answering")

    @api.get("/metrics", tags=["health"])
    async def prometheus(request: Request, caller: CallerDep) -> Response:
        backend = backend_of(request)
        return metrics.render(backend.store, await backend.call("all_host_stats", caller))

    @api.get(f"{API}/whoami", tags=["auth"])
    async def whoami(request: Request, caller: CallerDep) -> dict[str, Any]:
        me: dict[str, Any] = await backend_of(request).call("whoami", caller)
        return me

    # -- hosts ------------------------------------------------------------------------------
    @api.get(f"{API}/hosts", tags=["hosts"], response_model=Page)
    async def list_hosts(request: Request, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
                         cursor: str | None = None, sort: str | None = None,
                         state: HostState | None = None, driver: str | None = None) -> Response:
        backend = backend_of(request)
        field, desc = _sort(sort, HOST_SORTS)
        where: dict[str, Any] = {k: v for k, v in (("state", state), ("driver", driver))
                                 if v is not None}
        tenants = backend.gate.readable_tenants(_principal(request), Resource.HOSTS)
        if tenants is not None:
            where["tenant"] = tenants
        return _page_response(*backend.store.page_json(
            "host", where=where, sort=field, descending=desc, limit=limit, cursor=cursor))

    @api.post(f"{API}/hosts", status_code=201, tags=["hosts"])
    async def register_host(request: Request, caller: CallerDep, body: HostCreate) -> Host:
        host: Host = await backend_of(request).call("register_host", caller, body)
        return host

    @api.get(f"{API}/hosts/{{name}}", tags=["hosts"])
    async def get_host(request: Request, caller: CallerDep, name: str) -> dict[str, Any]:
        backend = backend_of(request)
        record = backend.store.get("host", name)
        if record is None:
            raise no_host(name)
        backend.gate.check(caller, _principal(request), Resource.HOSTS, Verb.READ,
                           record.data.get("tenant", "*"), name, hidden=no_host(name))
        return {**record.data, "revision": record.revision}

    @api.post(f"{API}/hosts/{{name}}/maintenance", tags=["hosts"])
    async def host_maintenance(request: Request, caller: CallerDep, name: str) -> Host:
        host: Host = await backend_of(request).call("set_host_state", caller, name,
                                                    HostState.MAINTENANCE)
        return host

    @api.post(f"{API}/hosts/{{name}}/activate", tags=["hosts"])
    async def host_activate(request: Request, caller: CallerDep, name: str) -> Host:
        host: Host = await backend_of(request).call("set_host_state", caller, name,
                                                    HostState.UP)
        return host

    @api.post(f"{API}/hosts/{{name}}/drain", status_code=202, tags=["hosts"])
    async def host_drain(request: Request, caller: CallerDep, name: str) -> Host:
        """Evacuate the host through migrations (idempotent); it takes no new VMs meanwhile.
        Its progress is the host's ``drain``; once empty the host is in maintenance."""
        host: Host = await backend_of(request).call("drain_host", caller, name)
        return host

    @api.post(f"{API}/hosts/{{name}}/drain/cancel", tags=["hosts"])
    async def host_drain_cancel(request: Request, caller: CallerDep, name: str) -> Host:
        """Stop the host's drain: its migrations roll back and the host is up again."""
        host: Host = await backend_of(request).call("cancel_drain", caller, name)
        return host

    @api.delete(f"{API}/hosts/{{name}}", status_code=204, tags=["hosts"])
    async def delete_host(request: Request, caller: CallerDep, name: str) -> Response:
        await backend_of(request).call("delete_host", caller, name)
        return Response(status_code=204)

    # -- VMs --------------------------------------------------------------------------------
    @api.get(f"{API}/vms", tags=["vms"], response_model=Page)
    async def list_vms(request: Request, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
                       cursor: str | None = None, sort: str | None = None,
                       state: VMState | None = None, host: str | None = None,
                       name: str | None = None) -> Response:
        backend = backend_of(request)
        field, desc = _sort(sort, VM_SORTS)
        where: dict[str, Any] = {k: v for k, v in (("state", state), ("host", host),
                                                   ("name", name)) if v is not None}
        tenants = backend.gate.readable_tenants(_principal(request), Resource.VMS)
        if tenants is not None:
            where["tenant"] = tenants
        return _page_response(*backend.store.page_json(
            "vm", where=where, sort=field, descending=desc, limit=limit, cursor=cursor))

    @api.post(f"{API}/vms", status_code=202, tags=["vms"])
    async def create_vm(request: Request, caller: CallerDep, body: VMCreate,
                        idempotency_key: Annotated[str | None, Header(max_length=200)] = None
                        ) -> VM:
        vm: VM = await backend_of(request).call("create_vm", caller, body, idempotency_key)
        return vm

    @api.get(f"{API}/vms/{{vm_id}}", tags=["vms"])
    async def get_vm(request: Request, caller: CallerDep, vm_id: str) -> dict[str, Any]:
        backend = backend_of(request)
        record = backend.store.get("vm", vm_id)
        if record is None:
            raise no_vm(vm_id)
        backend.gate.check(caller, _principal(request), Resource.VMS, Verb.READ,
                           record.data["tenant"], vm_id, hidden=no_vm(vm_id))
        return {**record.data, "revision": record.revision}

    @api.delete(f"{API}/vms/{{vm_id}}", status_code=202, tags=["vms"])
    async def delete_vm(request: Request, caller: CallerDep, vm_id: str) -> VM:
        vm: VM = await backend_of(request).call("delete_vm", caller, vm_id)
        return vm

    @api.get(f"{API}/vms/{{vm_id}}/snapshots", tags=["snapshots"])
    async def list_snapshots(request: Request, caller: CallerDep, vm_id: str) -> dict[str, Any]:
        return _items(await backend_of(request).call("snapshot", caller, vm_id, "list"))

    @api.post(f"{API}/vms/{{vm_id}}/snapshots", status_code=201, tags=["snapshots"])
    async def create_snapshot(request: Request, caller: CallerDep, vm_id: str,
                              body: SnapshotCreate) -> dict[str, Any]:
        snapshot: dict[str, Any] = await backend_of(request).call(
            "snapshot", caller, vm_id, "create", body.name)
        return snapshot

    @api.post(f"{API}/vms/{{vm_id}}/snapshots/{{name}}/revert", status_code=202,
              tags=["snapshots"])
    async def revert_snapshot(request: Request, caller: CallerDep, vm_id: str,
                              name: str) -> dict[str, Any]:
        observed: dict[str, Any] = await backend_of(request).call(
            "snapshot", caller, vm_id, "revert", name)
        return observed

    @api.delete(f"{API}/vms/{{vm_id}}/snapshots/{{name}}", status_code=204, tags=["snapshots"])
    async def delete_snapshot(request: Request, caller: CallerDep, vm_id: str,
                              name: str) -> Response:
        await backend_of(request).call("snapshot", caller, vm_id, "delete", name)
        return Response(status_code=204)

    @api.post(f"{API}/vms/{{vm_id}}/{{action}}", status_code=202, tags=["vms"])
    async def vm_action(request: Request, caller: CallerDep, vm_id: str, action: str,
                        body: Annotated[ActionBody | None, Body()] = None) -> VM:
        if action not in ("start", "stop", "reboot", "pause", "resume"):
            raise NotFound(f"no VM action {action!r}; use start, stop, reboot, pause or resume",
                           details={"action": action})
        vm: VM = await backend_of(request).call("vm_action", caller, vm_id, action,
                                                body.force if body else False)
        return vm

    # -- placement --------------------------------------------------------------------------
    @api.post(f"{API}/placement/plan", tags=["placement"])
    async def plan(request: Request, caller: CallerDep, body: PlanBody) -> dict[str, Any]:
        """Where these VMs would go (a dry run: nothing is created), and why."""
        return _items(await backend_of(request).call("plan", caller, body.vms))

    @api.post(f"{API}/placement/rebalance", tags=["placement"])
    async def rebalance(request: Request, caller: CallerDep,
                        body: Annotated[RebalanceBody | None, Body()] = None) -> dict[str, Any]:
        """Migrations that would cool hot hosts and even out the rest, each with its reason;
        with ``{"dry_run": false}`` they start (within the migration limits)."""
        result: dict[str, Any] = await backend_of(request).call(
            "rebalance", caller, body.dry_run if body else True)
        return result

    # -- migrations -------------------------------------------------------------------------
    @api.get(f"{API}/migrations", tags=["migrations"])
    async def list_migrations(request: Request, caller: CallerDep) -> dict[str, Any]:
        return _items(await backend_of(request).call("list_migrations", caller))

    @api.post(f"{API}/migrations", status_code=202, tags=["migrations"])
    async def create_migration(request: Request, caller: CallerDep,
                               body: MigrationCreate) -> Migration:
        """Start moving a VM to another host; with ``dry_run`` only the cost model's
        prediction (in ``prediction``) is returned and nothing moves."""
        migration: Migration = await backend_of(request).call("create_migration", caller, body)
        return migration

    @api.get(f"{API}/migrations/{{migration_id}}", tags=["migrations"])
    async def get_migration(request: Request, caller: CallerDep,
                            migration_id: str) -> Migration:
        migration: Migration = await backend_of(request).call("get_migration", caller,
                                                              migration_id)
        return migration

    @api.post(f"{API}/migrations/{{migration_id}}/{{action}}", status_code=202,
              tags=["migrations"])
    async def migration_action(request: Request, caller: CallerDep, migration_id: str,
                               action: str) -> Migration:
        if action not in ("cancel", "force-complete"):
            raise NotFound(f"no migration action {action!r}; use cancel or force-complete",
                           details={"action": action})
        migration: Migration = await backend_of(request).call("migration_action", caller,
                                                              migration_id, action)
        return migration

    # -- events -----------------------------------------------------------------------------
    @api.get(f"{API}/events", tags=["events"])
    async def events(request: Request, since: Annotated[int, Query(ge=0)] = 0,
                     limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100) -> dict[str, Any]:
        backend = backend_of(request)
        principal = _principal(request)
        readable = {kind: backend.gate.readable_tenants(principal, resource)
                    for kind, resource in (("vm", Resource.VMS), ("host", Resource.HOSTS),
                                           ("migration", Resource.MIGRATIONS))}
        batch = backend.store.events(since, limit=limit, kinds=list(readable))
        return {"items": [{"revision": ev.revision, "kind": ev.kind, "key": ev.key, "op": ev.op,
                           "time": ev.time, "data": ev.data} for ev in batch
                          if ev.data is not None and visible(ev.data, readable[ev.kind])],
                "next": batch[-1].revision if batch else since}

    # -- tenants, tokens, users, roles, bindings, audit ---------------------------------------
    @api.get(f"{API}/tenants", tags=["tenants"])
    async def list_tenants(request: Request, caller: CallerDep) -> dict[str, Any]:
        return _items(await backend_of(request).call("list_tenants", caller))

    @api.post(f"{API}/tenants", status_code=201, tags=["tenants"])
    async def create_tenant(request: Request, caller: CallerDep,
                            body: TenantCreate) -> dict[str, Any]:
        tenant: dict[str, Any] = await backend_of(request).call(
            "create_tenant", caller, body.name, body.quota, body.require_mfa)
        return tenant

    @api.get(f"{API}/tenants/{{name}}", tags=["tenants"])
    async def get_tenant(request: Request, caller: CallerDep, name: str) -> dict[str, Any]:
        tenant: dict[str, Any] = await backend_of(request).call("get_tenant", caller, name)
        return tenant

    @api.patch(f"{API}/tenants/{{name}}", tags=["tenants"])
    async def update_tenant(request: Request, caller: CallerDep, name: str,
                            body: TenantUpdate) -> dict[str, Any]:
        tenant: dict[str, Any] = await backend_of(request).call(
            "update_tenant", caller, name, body.quota, body.require_mfa)
        return tenant

    @api.delete(f"{API}/tenants/{{name}}", status_code=204, tags=["tenants"])
    async def delete_tenant(request: Request, caller: CallerDep, name: str) -> Response:
        await backend_of(request).call("delete_tenant", caller, name)
        return Response(status_code=204)

    @api.get(f"{API}/tokens", tags=["tokens"])
    async def list_tokens(request: Request, caller: CallerDep,
                          tenant: str | None = None) -> dict[str, Any]:
        return _items(await backend_of(request).call("list_tokens", caller, tenant))

    @api.post(f"{API}/tokens", status_code=201, tags=["tokens"])
    async def create_token(request: Request, caller: CallerDep,
                           body: TokenCreate) -> dict[str, Any]:
        token: dict[str, Any] = await backend_of(request).call(
            "create_token", caller, body.name, body.role, body.tenant, body.ttl_s)
        return token

    @api.delete(f"{API}/tokens/{{token_id}}", tags=["tokens"])
    async def revoke_token(request: Request, caller: CallerDep,
                           token_id: str) -> dict[str, Any]:
        token: dict[str, Any] = await backend_of(request).call("revoke_token", caller, token_id)
        return token

    @api.get(f"{API}/users", tags=["users"])
    async def list_users(request: Request, caller: CallerDep,
                         tenant: str | None = None) -> dict[str, Any]:
        return _items(await backend_of(request).call("list_users", caller, tenant))

    @api.post(f"{API}/users", status_code=201, tags=["users"])
    async def create_user(request: Request, caller: CallerDep, body: UserCreate) -> dict[str, Any]:
        user: dict[str, Any] = await backend_of(request).call(
            "create_user", caller, body.name, body.password, body.tenant)
        return user

    @api.delete(f"{API}/users/{{tenant}}/{{name}}", status_code=204, tags=["users"])
    async def delete_user(request: Request, caller: CallerDep, tenant: str,
                          name: str) -> Response:
        await backend_of(request).call("delete_user", caller, tenant, name)
        return Response(status_code=204)

    @api.post(f"{API}/users/{{tenant}}/{{name}}/unlock", status_code=204, tags=["users"])
    async def unlock_user(request: Request, caller: CallerDep, tenant: str,
                          name: str) -> Response:
        await backend_of(request).call("unlock_user", caller, tenant, name)
        return Response(status_code=204)

    @public.post(f"{API}/login", tags=["auth"])
    async def login(request: Request, caller: CallerDep, body: Login) -> JSONResponse:
        session: dict[str, Any] = await backend_of(request).call(
            "login", caller, body.tenant, body.name, body.password, body.totp)
        response = JSONResponse(session)
        response.set_cookie(SESSION_COOKIE, session["session"], httponly=True,
                            samesite="strict",
                            max_age=max(0, int(session["expires_at"] - time.time())))
        return response

    @api.post(f"{API}/logout", status_code=204, tags=["auth"])
    async def logout(request: Request, caller: CallerDep) -> Response:
        await backend_of(request).call("logout", caller)
        response = Response(status_code=204)
        response.delete_cookie(SESSION_COOKIE)
        return response

    @public.post(f"{API}/users/{{tenant}}/{{name}}/totp", tags=["auth"])
    async def totp(request: Request, caller: CallerDep, tenant: str, name: str,
                   body: TotpConfirm) -> dict[str, Any]:
        """Without ``code``: begin enrolment (secret and otpauth URI); with it: confirm."""
        backend = backend_of(request)
        if body.code is None:
            started: dict[str, Any] = await backend.call("begin_totp", caller, tenant, name,
                                                         body.password)
            return started
        await backend.call("confirm_totp", caller, tenant, name, body.password, body.code)
        return {"totp_enabled": True}

    @api.get(f"{API}/roles", tags=["roles"])
    async def list_roles(request: Request, caller: CallerDep) -> dict[str, Any]:
        return _items(await backend_of(request).call("list_roles", caller))

    @api.put(f"{API}/roles/{{name}}", tags=["roles"])
    async def put_role(request: Request, caller: CallerDep, name: str,
                       body: RolePut) -> dict[str, Any]:
        role: dict[str, Any] = await backend_of(request).call(
            "put_role", caller, name, body.permissions, body.description)
        return role

    @api.delete(f"{API}/roles/{{name}}", status_code=204, tags=["roles"])
    async def delete_role(request: Request, caller: CallerDep, name: str) -> Response:
        await backend_of(request).call("delete_role", caller, name)
        return Response(status_code=204)

    @api.get(f"{API}/bindings", tags=["bindings"])
    async def list_bindings(request: Request, caller: CallerDep,
                            tenant: str | None = None) -> dict[str, Any]:
        return _items(await backend_of(request).call("list_bindings", caller, tenant))

    @api.post(f"{API}/bindings", status_code=201, tags=["bindings"])
    async def bind(request: Request, caller: CallerDep, body: BindingBody) -> dict[str, Any]:
        binding: dict[str, Any] = await backend_of(request).call(
            "bind", caller, body.principal, body.role, body.tenant)
        return binding

    @api.delete(f"{API}/bindings", status_code=204, tags=["bindings"])
    async def unbind(request: Request, caller: CallerDep, principal: str, role: str,
                     tenant: str) -> Response:
        await backend_of(request).call("unbind", caller, principal, role, tenant)
        return Response(status_code=204)

    @api.get(f"{API}/audit", tags=["audit"])
    async def audit(request: Request, caller: CallerDep, since: Annotated[int, Query(ge=0)] = 0,
                    tenant: str | None = None) -> dict[str, Any]:
        return _items(await backend_of(request).call("audit", caller, since, tenant))

    @api.get(f"{API}/audit/verify", tags=["audit"])
    async def verify_audit(request: Request, caller: CallerDep) -> dict[str, Any]:
        result: dict[str, Any] = await backend_of(request).call("verify_audit", caller)
        return result

    app.include_router(public)
    app.include_router(api)
    return app
