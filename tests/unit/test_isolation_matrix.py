"""Tenant isolation, generated from the app's route table.

Every route x {admin, operator, viewer, no token, expired token, another tenant's operator} x
{an object of tenant acme, an object of tenant globex}: exactly the expected status, and no
response ever carries a tenant's data to a caller without a role there. A route added to the API
without a case here fails ``test_every_route_has_a_case``.

Expectations come from the roles as the product defines them (not from the policy code):
admin does everything; operator manages VMs, migrations, volumes and placement in its tenant,
reads and acts on (drains, maintains) its hosts, reads its tenant and metrics; viewer reads those
in its tenant. Objects of a tenant the caller holds no role in answer 404, cluster-wide
operations 403, missing or expired credentials 401.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from novacron.access import Caller
from novacron.auth import AuthServices
from novacron.controlplane import ControlPlane
from novacron.errors import InvalidTransition, NotSupported
from novacron.localfleet import LocalFleet
from novacron.model import HostCreate, MigrationCreate, VMCreate
from novacron.secured import SecuredPlane
from novacron.store import Store
from serve.api import build_app
from serve.backend import LocalBackend
from tests.conftest import kill_guests_under, sim_host_config
from tests.unit.test_api import CHEAP_KDF

A = "/api/v1"
TENANTS = ("acme", "globex")
PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("POST", f"{A}/login"),
          ("POST", f"{A}/users/{{tenant}}/{{name}}/totp")}
WORKLOAD = {"vms", "migrations", "volumes", "placement"}
ROLE_ALLOWS: dict[str, dict[str, set[str]]] = {
    "operator": {**{r: {"read", "create", "update", "delete", "act"} for r in WORKLOAD},
                 "hosts": {"read", "act"}, "tenants": {"read"}, "metrics": {"read"}},
    "viewer": {**{r: {"read"} for r in WORKLOAD},
               "hosts": {"read"}, "tenants": {"read"}, "metrics": {"read"}},
}
HOME = {"operator": "acme", "viewer": "acme", "expired": "acme", "other": "globex"}
ROLE = {"operator": "operator", "viewer": "viewer", "other": "operator"}


class World:
    """Two tenants, each with a dedicated host, a VM and a user; tokens for every principal."""

    def __init__(self, state_dir: Path) -> None:
        self.now = [1_000_000.0]
        self.state_dir = state_dir
        self.store = Store(state_dir / "state.db")
        self.fleet = LocalFleet(state_dir, heartbeat_interval_s=0.5, stop_timeout_s=5)
        self.plane = ControlPlane(self.store, self.fleet, heartbeat_interval_s=0.5,
                                  heartbeat_misses=1000)
        self.fleet.bind(self.plane)
        auth = AuthServices.create(self.store, password_parameters=CHEAP_KDF,
                                   clock=lambda: self.now[0])
        self.secured = SecuredPlane(self.plane, auth)
        admin_token = auth.first_start()
        assert admin_token is not None
        self.tokens = {"admin": admin_token.get_secret_value()}
        self.admin = Caller.with_token(self.tokens["admin"])
        self.hosts: dict[str, str] = {}
        self.vms: dict[str, str] = {}
        self.counter = itertools.count()
        for tenant in TENANTS:
            self.secured.create_tenant(self.admin, tenant)
            self.hosts[tenant] = self.host(tenant)
            self.vms[tenant] = self.vm(tenant)
            self.secured.create_user(self.admin, f"user-{tenant}", "pw-long-enough-1", tenant)
        for who, tenant in HOME.items():
            if who in ROLE:
                issued = self.secured.create_token(self.admin, who, ROLE[who], tenant)
                self.tokens[who] = issued["token"]
        expiring = self.secured.create_token(self.admin, "expiring", "operator", "acme",
                                             ttl_s=60)
        self.tokens["expired"] = expiring["token"]
        self.now[0] += 3600  # the expiring token is now expired; the others live for 90 days

    def unique(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"

    def host(self, tenant: str) -> str:
        name = self.unique(f"host-{tenant}-")
        self.secured.register_host(self.admin, HostCreate(
            name=name, driver="sim", tenant=tenant, config=sim_host_config(self.state_dir)))
        return name

    def vm(self, tenant: str) -> str:
        vm = self.secured.create_vm(self.admin, VMCreate(
            name=self.unique(f"vm-{tenant}-"), cpus=1, memory_mib=32, start=False,
            tenant=tenant))
        return vm.id

    def markers(self, tenant: str) -> set[str]:
        """Strings that only show up in a response that carries ``tenant``'s data."""
        return {self.vms[tenant], self.hosts[tenant], f"user-{tenant}"}

    def close(self) -> None:
        self.fleet.close()
        self.store.close()
        kill_guests_under(self.state_dir)


# A case: the permission it needs, its scope, and how to make (path, body) for tenant T.
#   scope "object": an object of tenant T; "create": a new object in T; "list": a listing;
#   "cluster": a cluster-wide operation; "any": any authenticated caller.
Make = Callable[[World, str], tuple[str, Any]]


@dataclass(frozen=True)
class Case:
    resource: str
    verb: str
    scope: str
    make: Make


def _fresh_token(w: World, t: str) -> tuple[str, Any]:
    return f"{A}/tokens/{w.secured.create_token(w.admin, w.unique('t'), 'viewer', t)['id']}", None


def _fresh_user(w: World, t: str) -> tuple[str, Any]:
    name = w.unique("u")
    w.secured.create_user(w.admin, name, "pw-long-enough-1", t)
    return f"{A}/users/{t}/{name}", None


def _fresh_binding(w: World, t: str) -> tuple[str, Any]:
    who = f"user:{t}/{w.unique('b')}"
    w.secured.bind(w.admin, who, "viewer", t)
    return f"{A}/bindings?principal={who}&role=viewer&tenant={t}", None


def _fresh_role(w: World, t: str) -> tuple[str, Any]:
    name = w.unique("role")
    w.secured.put_role(w.admin, name, ["vms:read"])
    return f"{A}/roles/{name}", None


def _fresh_tenant(w: World, t: str) -> tuple[str, Any]:
    name = w.unique("tenant")
    w.secured.create_tenant(w.admin, name)
    return f"{A}/tenants/{name}", None


def _fresh_migration(w: World, t: str) -> str:
    """A migration of tenant T's VM to a second host of T. The in-process fleet cannot run
    migrations, so the record ends ``failed`` at once; it is still an object of T."""
    target = w.host(t)
    req = MigrationCreate(vm=w.vms[t], target_host=target, mode="cold")
    deadline = time.monotonic() + 10
    while True:
        try:
            w.secured.create_migration(w.admin, req)
        except NotSupported:
            return next(m.id for m in w.plane.list_migrations(tenant=t) if m.target == target)
        except InvalidTransition:  # the VM is settling after the previous failed migration
            assert time.monotonic() < deadline
            time.sleep(0.05)


def _draining_host(w: World, t: str) -> tuple[str, Any]:
    """A host of tenant T whose drain runs: its VM cannot leave (the in-process fleet runs no
    migration), so the drain stays active until cancelled."""
    host = w.host(t)
    w.secured.create_vm(w.admin, VMCreate(name=w.unique(f"vm-{t}-"), cpus=1, memory_mib=32,
                                          start=False, tenant=t, host=host))
    w.secured.drain_host(w.admin, host)
    return f"{A}/hosts/{host}/drain/cancel", None


CASES: dict[tuple[str, str], Case] = {
    ("GET", f"{A}/migrations"): Case("migrations", "read", "list", lambda w, t: (
        f"{A}/migrations", None)),
    ("POST", f"{A}/migrations"): Case("migrations", "create", "object", lambda w, t: (
        f"{A}/migrations", {"vm": w.vms[t], "target_host": w.hosts[t], "mode": "cold"})),
    ("GET", f"{A}/migrations/{{migration_id}}"): Case("migrations", "read", "object", lambda w, t: (
        f"{A}/migrations/{_fresh_migration(w, t)}", None)),
    ("POST", f"{A}/migrations/{{migration_id}}/{{action}}"): Case(
        "migrations", "act", "object", lambda w, t: (
            f"{A}/migrations/{_fresh_migration(w, t)}/cancel", None)),
    ("GET", "/metrics"): Case("metrics", "read", "cluster", lambda w, t: ("/metrics", None)),
    ("GET", f"{A}/whoami"): Case("", "", "any", lambda w, t: (f"{A}/whoami", None)),
    ("GET", f"{A}/hosts"): Case("hosts", "read", "list", lambda w, t: (f"{A}/hosts", None)),
    ("POST", f"{A}/hosts"): Case("hosts", "create", "create", lambda w, t: (
        f"{A}/hosts", {"name": w.unique("h"), "driver": "sim", "tenant": t,
                       "config": sim_host_config(w.state_dir)})),
    ("GET", f"{A}/hosts/{{name}}"): Case("hosts", "read", "object", lambda w, t: (
        f"{A}/hosts/{w.hosts[t]}", None)),
    ("POST", f"{A}/hosts/{{name}}/maintenance"): Case("hosts", "act", "object", lambda w, t: (
        f"{A}/hosts/{w.hosts[t]}/maintenance", None)),
    ("POST", f"{A}/hosts/{{name}}/activate"): Case("hosts", "act", "object", lambda w, t: (
        f"{A}/hosts/{w.hosts[t]}/activate", None)),
    ("POST", f"{A}/hosts/{{name}}/drain"): Case("hosts", "act", "object", lambda w, t: (
        f"{A}/hosts/{w.host(t)}/drain", None)),
    ("POST", f"{A}/hosts/{{name}}/drain/cancel"): Case("hosts", "act", "object", _draining_host),
    ("DELETE", f"{A}/hosts/{{name}}"): Case("hosts", "delete", "object", lambda w, t: (
        f"{A}/hosts/{w.host(t)}", None)),
    ("GET", f"{A}/vms"): Case("vms", "read", "list", lambda w, t: (f"{A}/vms", None)),
    ("POST", f"{A}/vms"): Case("vms", "create", "create", lambda w, t: (
        f"{A}/vms", {"name": w.unique("v"), "cpus": 1, "memory_mib": 32, "start": False,
                     "tenant": t})),
    ("GET", f"{A}/vms/{{vm_id}}"): Case("vms", "read", "object", lambda w, t: (
        f"{A}/vms/{w.vms[t]}", None)),
    ("DELETE", f"{A}/vms/{{vm_id}}"): Case("vms", "delete", "object", lambda w, t: (
        f"{A}/vms/{w.vm(t)}", None)),
    ("POST", f"{A}/vms/{{vm_id}}/{{action}}"): Case("vms", "act", "object", lambda w, t: (
        f"{A}/vms/{w.vms[t]}/stop", None)),
    ("GET", f"{A}/vms/{{vm_id}}/snapshots"): Case("vms", "read", "object", lambda w, t: (
        f"{A}/vms/{w.vms[t]}/snapshots", None)),
    ("POST", f"{A}/vms/{{vm_id}}/snapshots"): Case("vms", "act", "object", lambda w, t: (
        f"{A}/vms/{w.vms[t]}/snapshots", {"name": "s1"})),
    ("POST", f"{A}/vms/{{vm_id}}/snapshots/{{name}}/revert"): Case(
        "vms", "act", "object", lambda w, t: (f"{A}/vms/{w.vms[t]}/snapshots/s1/revert", None)),
    ("DELETE", f"{A}/vms/{{vm_id}}/snapshots/{{name}}"): Case(
        "vms", "act", "object", lambda w, t: (f"{A}/vms/{w.vms[t]}/snapshots/s1", None)),
    ("POST", f"{A}/placement/plan"): Case("placement", "read", "create", lambda w, t: (
        f"{A}/placement/plan", {"vms": [{"name": "p", "cpus": 1, "memory_mib": 32,
                                         "tenant": t}]})),
    ("POST", f"{A}/placement/rebalance"): Case("placement", "act", "cluster", lambda w, t: (
        f"{A}/placement/rebalance", {"dry_run": False})),
    ("GET", f"{A}/events"): Case("vms", "read", "list", lambda w, t: (
        f"{A}/events?limit=1000", None)),
    ("GET", f"{A}/tenants"): Case("tenants", "read", "list", lambda w, t: (f"{A}/tenants", None)),
    ("POST", f"{A}/tenants"): Case("tenants", "create", "cluster", lambda w, t: (
        f"{A}/tenants", {"name": w.unique("newtenant")})),
    ("GET", f"{A}/tenants/{{name}}"): Case("tenants", "read", "object", lambda w, t: (
        f"{A}/tenants/{t}", None)),
    ("PATCH", f"{A}/tenants/{{name}}"): Case("tenants", "update", "cluster", lambda w, t: (
        f"{A}/tenants/{t}", {"quota": {"vms": 1000}})),
    ("DELETE", f"{A}/tenants/{{name}}"): Case("tenants", "delete", "cluster", _fresh_tenant),
    ("GET", f"{A}/tokens"): Case("tokens", "read", "list", lambda w, t: (f"{A}/tokens", None)),
    ("POST", f"{A}/tokens"): Case("tokens", "create", "create", lambda w, t: (
        f"{A}/tokens", {"name": w.unique("tok"), "role": "viewer", "tenant": t})),
    ("DELETE", f"{A}/tokens/{{token_id}}"): Case("tokens", "delete", "object", _fresh_token),
    ("GET", f"{A}/users"): Case("users", "read", "list", lambda w, t: (f"{A}/users", None)),
    ("POST", f"{A}/users"): Case("users", "create", "create", lambda w, t: (
        f"{A}/users", {"name": w.unique("nu"), "password": "pw-long-enough-1", "tenant": t})),
    ("DELETE", f"{A}/users/{{tenant}}/{{name}}"): Case("users", "delete", "object", _fresh_user),
    ("POST", f"{A}/users/{{tenant}}/{{name}}/unlock"): Case("users", "update", "object",
                                                            lambda w, t: (
        f"{A}/users/{t}/user-{t}/unlock", None)),
    ("POST", f"{A}/logout"): Case("", "", "any", lambda w, t: (f"{A}/logout", None)),
    ("GET", f"{A}/roles"): Case("", "", "any", lambda w, t: (f"{A}/roles", None)),
    ("PUT", f"{A}/roles/{{name}}"): Case("roles", "create", "cluster", lambda w, t: (
        f"{A}/roles/{w.unique('r')}", {"permissions": ["vms:read"]})),
    ("DELETE", f"{A}/roles/{{name}}"): Case("roles", "delete", "cluster", _fresh_role),
    ("GET", f"{A}/bindings"): Case("bindings", "read", "list", lambda w, t: (
        f"{A}/bindings", None)),
    ("POST", f"{A}/bindings"): Case("bindings", "create", "create", lambda w, t: (
        f"{A}/bindings", {"principal": f"user:{t}/{w.unique('p')}", "role": "viewer",
                          "tenant": t})),
    ("DELETE", f"{A}/bindings"): Case("bindings", "delete", "object", _fresh_binding),
    ("GET", f"{A}/audit"): Case("audit", "read", "object", lambda w, t: (
        f"{A}/audit?tenant={t}", None)),
    ("GET", f"{A}/audit/verify"): Case("audit", "read", "cluster", lambda w, t: (
        f"{A}/audit/verify", None)),
}

def api_routes(routes: list[Any]) -> Iterator[APIRoute]:
    """Every APIRoute of the app, through included routers (kept nested by FastAPI)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from api_routes(route.original_router.routes)


ROUTES = sorted((method, route.path) for route in api_routes(build_app().routes)
                for method in route.methods if (method, route.path) not in PUBLIC)
PRINCIPALS = ("admin", "operator", "viewer", "none", "expired", "other")


def expected(who: str, case: Case, tenant: str) -> str:
    """'ok' (past the gate: any answer but 401/403/404), or the exact refusal."""
    if who in ("none", "expired"):
        return "401"
    if who == "admin" or case.scope in ("any", "list"):
        return "ok"
    if case.scope == "cluster":
        return "403"
    if HOME[who] != tenant:
        return "404"
    return "ok" if case.verb in ROLE_ALLOWS[ROLE[who]].get(case.resource, set()) else "403"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[World, TestClient]]:
    w = World(tmp_path_factory.mktemp("isolation"))
    app = build_app()
    app.state.backend = LocalBackend(w.secured)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield w, client
    w.close()


def test_every_route_has_a_case() -> None:
    assert len(ROUTES) > 30
    assert [r for r in ROUTES if r not in CASES] == []
    assert [c for c in CASES if c not in ROUTES] == []  # no case for a route that is gone


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_route_isolation(world: tuple[World, TestClient], method: str, path: str) -> None:
    w, client = world
    case = CASES[(method, path)]
    failures = []
    for who, tenant in itertools.product(PRINCIPALS, TENANTS):
        url, body = case.make(w, tenant)
        headers = {} if who == "none" else {"Authorization": f"Bearer {w.tokens[who]}"}
        r = client.request(method, url, json=body, headers=headers)
        want = expected(who, case, tenant)
        got_ok = r.status_code not in (401, 403, 404) and r.status_code < 500
        if (want == "ok" and not got_ok) or (want != "ok" and str(r.status_code) != want):
            failures.append(f"{who} on {tenant}: {r.status_code} (want {want}) {r.text[:160]}")
        if who != "admin":
            sent = url + json.dumps(body)
            foreign = [t for t in TENANTS if who in ("none", "expired") or HOME[who] != t]
            leaked = {m for t in foreign for m in w.markers(t) if m in r.text and m not in sent}
            if leaked:
                failures.append(f"{who} on {tenant}: response leaks {sorted(leaked)}")
    assert not failures, "\n".join(failures)


def test_public_routes_need_no_token(world: tuple[World, TestClient]) -> None:
    _, client = world
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    r = client.post(f"{A}/login", json={"tenant": "acme", "name": "user-acme",
                                        "password": "wrong-password"})
    assert r.status_code == 401
    assert "wrong-password" not in r.text


@pytest.mark.parametrize("header", [
    "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer nc_", "Bearer nc_abc_def",
    "Bearer a.b.c", "Bearer " + "x" * 5000, "Bearer nc_'; DROP TABLE records;--",
    "bearer\tnc_x_y", "Bearer ncs_" + "0" * 64,
])
def test_malformed_credentials_are_401(world: tuple[World, TestClient], header: str) -> None:
    _, client = world
    r = client.get(f"{A}/vms", headers={"Authorization": header})
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthenticated"
    secret = header.partition(" ")[2]
    assert len(secret) < 8 or secret not in r.text


def test_oversized_and_injection_shaped_input(world: tuple[World, TestClient]) -> None:
    w, client = world
    auth = {"Authorization": f"Bearer {w.tokens['admin']}"}
    r = client.post(f"{A}/vms", content=b"{" + b" " * (2 << 20) + b"}", headers={
        **auth, "content-type": "application/json"})
    assert r.status_code == 413
    for name in ("x'; DROP TABLE records;--", "../../etc/passwd", "a" * 300, "<script>", "$(id)"):
        r = client.post(f"{A}/vms", json={"name": name, "cpus": 1, "memory_mib": 32}, headers=auth)
        assert r.status_code == 422, (name, r.text)
    r = client.get(f"{A}/vms/'; DROP TABLE records;--", headers=auth)
    assert r.status_code == 404
    assert client.get(f"{A}/vms?sort=name);--", headers=auth).status_code == 422
