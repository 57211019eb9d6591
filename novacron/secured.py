"""The control plane as users reach it: every call authenticated, authorized, audited.

:class:`SecuredPlane` wraps :class:`~novacron.controlplane.ControlPlane` and the auth services.
Each public method takes the :class:`~novacron.access.Caller` first, finds the tenant of its
target, asks the :class:`~novacron.access.Gate`, runs, and appends the outcome to the
hash-chained audit log. Tenant quotas are checked under the control plane's lock, so concurrent
creates cannot overshoot them. Both the HTTP API and the driver API (through the controller actor)
call these methods: there is no unauthenticated path to a user-facing operation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

from novacron.access import Caller, Gate, visible
from novacron.auth import (
    ALL_TENANTS,
    Action,
    AuditResult,
    AuthServices,
    Principal,
    Resource,
    Role,
    Usage,
    Verb,
    check_quota,
    decide_grant,
)
from novacron.auth.quotas import Quota
from novacron.auth.tenants import DEFAULT_TENANT
from novacron.controlplane import ControlPlane
from novacron.errors import InvalidRequest, NotFound, NovaCronError
from novacron.evacuation import Evacuator
from novacron.model import VM, Host, HostCreate, Migration, MigrationCreate, VMCreate, VMSpec
from novacron.rebalancing import Rebalancer
from novacron.states import HostState

log = logging.getLogger("novacron.secured")
T = TypeVar("T")

_R, _V = Resource, Verb


def no_vm(ref: str) -> NotFound:
    """What a VM the caller may not see answers: the same as one that does not exist."""
    return NotFound(f"no VM with id or name {ref!r}", details={"vm": ref})


def no_host(name: str) -> NotFound:
    """What a host the caller may not see answers: the same as one that does not exist."""
    return NotFound(f"no host named {name!r}", details={"host": name})


def no_migration(ref: str) -> NotFound:
    """What a migration the caller may not see answers: the same as one that does not exist."""
    return NotFound(f"no migration with id {ref!r}", details={"migration": ref})


def home_tenant(principal: Principal) -> str:
    """Where a principal's new objects go: its own tenant, or ``default`` for cluster-wide."""
    return principal.tenant if principal.tenant not in (None, ALL_TENANTS) else DEFAULT_TENANT


class SecuredPlane:
    """User-facing operations of the control plane, each checked by the gate and audited."""

    def __init__(self, plane: ControlPlane, auth: AuthServices, *,
                 evacuator: Evacuator | None = None, rebalancer: Rebalancer | None = None) -> None:
        self.plane = plane
        self.auth = auth
        self.evacuator = evacuator or Evacuator(plane)
        self.rebalancer = rebalancer or Rebalancer(plane)
        self.gate = Gate(auth.authenticator, self._audit_sink)

    def _audit_sink(self, **entry: Any) -> None:
        self.auth.audit.append(**entry)

    # -- plumbing -----------------------------------------------------------------------------
    def _run(self, caller: Caller, principal: Principal, action: str, tenant: str | None,
             target: str | None, fn: Callable[[], T]) -> T:
        """Run a mutation and audit its outcome (success, or the error's code)."""
        try:
            result = fn()
        except NovaCronError as exc:
            self.auth.audit.append(actor=principal.id, action=action, result=AuditResult.FAILED,
                                   tenant=tenant, target=target, request_id=caller.request_id,
                                   detail={"error": exc.code})
            raise
        self.auth.audit.append(actor=principal.id, action=action, result=AuditResult.SUCCESS,
                               tenant=tenant, target=target, request_id=caller.request_id)
        return result

    def _vm(self, caller: Caller, verb: Verb, vm_id: str) -> tuple[Principal, VM]:
        principal = self.gate.principal(caller)
        vm = self.plane.find_vm(vm_id, tenant=home_tenant(principal))
        self.gate.check(caller, principal, _R.VMS, _V.READ, vm.tenant, vm.id,
                        hidden=no_vm(vm_id))
        if verb != _V.READ:
            self.gate.check(caller, principal, _R.VMS, verb, vm.tenant, vm.id)
        return principal, vm

    def _host(self, caller: Caller, verb: Verb, name: str) -> tuple[Principal, Host]:
        principal = self.gate.principal(caller)
        host = self.plane.get_host(name)
        self.gate.check(caller, principal, _R.HOSTS, _V.READ, host.tenant, host.name,
                        hidden=no_host(name))
        if verb != _V.READ:
            self.gate.check(caller, principal, _R.HOSTS, verb, host.tenant, host.name)
        return principal, host

    def whoami(self, caller: Caller) -> dict[str, Any]:
        """The caller as the policy sees it (no secrets)."""
        p = self.gate.principal(caller)
        return {"id": p.id, "kind": p.kind.value, "tenant": p.tenant,
                "roles": [{"role": g.role, "tenant": g.tenant} for g in p.grants]}

    # -- status -------------------------------------------------------------------------------
    def status(self, caller: Caller) -> dict[str, Any]:
        """Counts of what the caller may see."""
        principal = self.gate.principal(caller)
        tenants = self.gate.readable_tenants(principal, _R.VMS)
        if tenants is None:
            return self.plane.status()
        vms = [vm for t in sorted(tenants) for vm in self.plane.list_vms(tenant=t)]
        by_state: dict[str, int] = {}
        for vm in vms:
            by_state[vm.state.value] = by_state.get(vm.state.value, 0) + 1
        hosts = self.list_hosts(caller)
        return {"hosts": len(hosts), "hosts_up": sum(h.state == HostState.UP for h in hosts),
                "vms": len(vms), "vms_by_state": by_state,
                "revision": self.plane.store.head_revision()}

    # -- hosts --------------------------------------------------------------------------------
    def register_host(self, caller: Caller, req: HostCreate) -> Host:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.HOSTS, _V.CREATE, req.tenant, req.name)
        return self._run(caller, principal, "hosts:create", req.tenant, req.name,
                         lambda: self.plane.register_host(req))

    def get_host(self, caller: Caller, name: str) -> Host:
        return self._host(caller, _V.READ, name)[1]

    def list_hosts(self, caller: Caller) -> list[Host]:
        tenants = self.gate.readable_tenants(self.gate.principal(caller), _R.HOSTS)
        return [h for h in self.plane.list_hosts() if visible({"tenant": h.tenant}, tenants)]

    def set_host_state(self, caller: Caller, name: str, state: HostState) -> Host:
        principal, host = self._host(caller, _V.ACT, name)
        return self._run(caller, principal, f"hosts:{state.value}", host.tenant, name,
                         lambda: self.plane.set_host_state(name, state))

    def drain_host(self, caller: Caller, name: str) -> Host:
        """Start evacuating a host (idempotent); its progress is on the host's ``drain``."""
        principal, host = self._host(caller, _V.ACT, name)
        return self._run(caller, principal, "hosts:drain", host.tenant, name,
                         lambda: self.evacuator.start(name))

    def cancel_drain(self, caller: Caller, name: str) -> Host:
        """Stop a host's drain: its migrations roll back and the host is up again."""
        principal, host = self._host(caller, _V.ACT, name)
        return self._run(caller, principal, "hosts:drain-cancel", host.tenant, name,
                         lambda: self.evacuator.cancel(name))

    def delete_host(self, caller: Caller, name: str) -> None:
        principal, host = self._host(caller, _V.DELETE, name)
        self._run(caller, principal, "hosts:delete", host.tenant, name,
                  lambda: self.plane.delete_host(name))

    def all_host_stats(self, caller: Caller) -> dict[str, dict[str, Any]]:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.METRICS, _V.READ, ALL_TENANTS)
        return self.plane.all_host_stats()

    # -- VMs ----------------------------------------------------------------------------------
    def create_vm(self, caller: Caller, req: VMCreate, request_id: str | None = None) -> VM:
        principal = self.gate.principal(caller)
        tenant = req.tenant or home_tenant(principal)
        self.gate.check(caller, principal, _R.VMS, _V.CREATE, tenant, req.name)
        return self._run(caller, principal, "vms:create", tenant, req.name,
                         lambda: self.plane.create_vm(req, tenant=tenant,
                                                      request_id=request_id or caller.request_id,
                                                      admit=self._within_quota))

    def _within_quota(self, spec: VMSpec, tenant: str) -> None:
        quota = self.auth.tenants.get(tenant).quota
        if quota == Quota():
            return
        usage = Usage()
        for vm in self.plane.list_vms(tenant=tenant):
            usage = usage + Usage.of_vm(vm.spec.cpus, vm.spec.memory_mib, vm.spec.disk_gib)
        check_quota(usage, Usage.of_vm(spec.cpus, spec.memory_mib, spec.disk_gib), quota,
                    tenant=tenant)

    def plan(self, caller: Caller, vms: list[VMCreate]) -> list[dict[str, Any]]:
        """A placement dry run for one or many VMs (one tenant per call), with explanations."""
        principal = self.gate.principal(caller)
        tenants = {req.tenant or home_tenant(principal) for req in vms}
        if len(tenants) != 1:
            raise InvalidRequest("plan the VMs of one tenant per call",
                                 details={"tenants": sorted(tenants)})
        tenant = tenants.pop()
        self.gate.check(caller, principal, _R.PLACEMENT, _V.READ, tenant)
        specs = [VMSpec.model_validate(r.model_dump(exclude={"host", "start", "tenant"}))
                 for r in vms]
        return self.plane.plan(specs, tenant=tenant, pinned=[r.host for r in vms])

    def rebalance(self, caller: Caller, dry_run: bool = True) -> dict[str, Any]:
        """Moves that even out the hosts, with reasons; without ``dry_run`` they start. It moves
        every tenant's VMs across shared hosts, so it is a cluster-wide permission."""
        principal = self.gate.principal(caller)
        verb = _V.READ if dry_run else _V.ACT
        self.gate.check(caller, principal, _R.PLACEMENT, verb, ALL_TENANTS)
        if dry_run:
            return self.rebalancer.run(dry_run=True)
        return self._run(caller, principal, "placement:rebalance", ALL_TENANTS, None,
                         lambda: self.rebalancer.run(dry_run=False))

    def get_vm(self, caller: Caller, vm_id: str) -> VM:
        return self._vm(caller, _V.READ, vm_id)[1]

    def list_vms(self, caller: Caller, host: str | None = None) -> list[VM]:
        tenants = self.gate.readable_tenants(self.gate.principal(caller), _R.VMS)
        if tenants is None:
            return self.plane.list_vms(host=host)
        return [vm for t in sorted(tenants) for vm in self.plane.list_vms(host=host, tenant=t)]

    def vm_action(self, caller: Caller, vm_id: str, action: str, force: bool = False) -> VM:
        principal, vm = self._vm(caller, _V.ACT, vm_id)
        return self._run(caller, principal, f"vms:{action}", vm.tenant, vm.id,
                         lambda: self.plane.vm_action(vm.id, action, force=force))

    def delete_vm(self, caller: Caller, vm_id: str) -> VM:
        principal, vm = self._vm(caller, _V.DELETE, vm_id)
        return self._run(caller, principal, "vms:delete", vm.tenant, vm.id,
                         lambda: self.plane.delete_vm(vm.id))

    def snapshot(self, caller: Caller, vm_id: str, op: str, name: str | None = None) -> Any:
        principal, vm = self._vm(caller, _V.READ if op == "list" else _V.ACT, vm_id)
        if op == "list":
            return self.plane.snapshot(vm.id, op)
        return self._run(caller, principal, f"vms:snapshot-{op}", vm.tenant, vm.id,
                         lambda: self.plane.snapshot(vm.id, op, name))

    # -- migrations ---------------------------------------------------------------------------
    def create_migration(self, caller: Caller, req: MigrationCreate) -> Migration:
        """Start moving a VM the caller may act on to a host it may see; with ``dry_run``,
        only the cost model's prediction."""
        principal, vm = self._vm(caller, _V.READ, req.vm)
        self.gate.check(caller, principal, _R.MIGRATIONS, _V.READ if req.dry_run else _V.CREATE,
                        vm.tenant, vm.id)
        self._host(caller, _V.READ, req.target_host)
        if req.dry_run:
            return self.plane.create_migration(vm.id, req)
        return self._run(caller, principal, "migrations:create", vm.tenant, vm.id,
                         lambda: self.plane.create_migration(vm.id, req))

    def _migration(self, caller: Caller, verb: Verb,
                   migration_id: str) -> tuple[Principal, Migration]:
        principal = self.gate.principal(caller)
        migration = self.plane.get_migration(migration_id)
        self.gate.check(caller, principal, _R.MIGRATIONS, _V.READ, migration.tenant,
                        migration.id, hidden=no_migration(migration_id))
        if verb != _V.READ:
            self.gate.check(caller, principal, _R.MIGRATIONS, verb, migration.tenant,
                            migration.id)
        return principal, migration

    def get_migration(self, caller: Caller, migration_id: str) -> Migration:
        return self._migration(caller, _V.READ, migration_id)[1]

    def list_migrations(self, caller: Caller) -> list[Migration]:
        tenants = self.gate.readable_tenants(self.gate.principal(caller), _R.MIGRATIONS)
        if tenants is None:
            return self.plane.list_migrations()
        return [m for t in sorted(tenants) for m in self.plane.list_migrations(tenant=t)]

    def migration_action(self, caller: Caller, migration_id: str, action: str) -> Migration:
        """``cancel`` (roll back) or ``force-complete`` a running migration."""
        principal, migration = self._migration(caller, _V.ACT, migration_id)
        return self._run(caller, principal, f"migrations:{action}", migration.tenant,
                         migration.id,
                         lambda: self.plane.request_migration(migration.id, action))

    # -- tenants ------------------------------------------------------------------------------
    def create_tenant(self, caller: Caller, name: str, quota: dict[str, Any] | None = None,
                      require_mfa: bool = False) -> dict[str, Any]:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.TENANTS, _V.CREATE, ALL_TENANTS, name)
        tenant = self._run(caller, principal, "tenants:create", name, name,
                           lambda: self.auth.tenants.create(
                               name, quota=Quota.model_validate(quota or {}),
                               require_mfa=require_mfa))
        return tenant.model_dump(mode="json")

    def list_tenants(self, caller: Caller) -> list[dict[str, Any]]:
        principal = self.gate.principal(caller)
        return [t.model_dump(mode="json") for t in self.auth.tenants.list()
                if self.gate.may(principal, _R.TENANTS, _V.READ, t.name)]

    def get_tenant(self, caller: Caller, name: str) -> dict[str, Any]:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.TENANTS, _V.READ, name, name)
        return self.auth.tenants.get(name).model_dump(mode="json")

    def update_tenant(self, caller: Caller, name: str, quota: dict[str, Any] | None = None,
                      require_mfa: bool | None = None) -> dict[str, Any]:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.TENANTS, _V.UPDATE, ALL_TENANTS, name)
        tenant = self._run(caller, principal, "tenants:update", name, name,
                           lambda: self.auth.tenants.update(
                               name, quota=None if quota is None else Quota.model_validate(quota),
                               require_mfa=require_mfa))
        return tenant.model_dump(mode="json")

    def delete_tenant(self, caller: Caller, name: str) -> None:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.TENANTS, _V.DELETE, ALL_TENANTS, name)

        def delete() -> None:
            count = len(self.plane.list_vms(tenant=name))
            if count:
                raise InvalidRequest(f"tenant {name!r} still has {count} VM(s)",
                                     details={"tenant": name, "vms": count})
            for binding in self.auth.roles.bindings(tenant=name):
                self.auth.roles.unbind(binding.principal, binding.role, name)
            for token in self.auth.tokens.list(tenant=name):
                self.auth.tokens.revoke(token.id)
            for user in self.auth.users.list(tenant=name):
                self.auth.users.delete(name, user.name)
            self.auth.tenants.delete(name)

        self._run(caller, principal, "tenants:delete", name, name, delete)

    # -- tokens -------------------------------------------------------------------------------
    def create_token(self, caller: Caller, name: str, role: str, tenant: str | None = None,
                     ttl_s: float = 90 * 86400) -> dict[str, Any]:
        """A new API token; its secret is in the answer, once, and nowhere else."""
        principal = self.gate.principal(caller)
        tenant = tenant or home_tenant(principal)
        decision = decide_grant(principal, self.auth.roles.get_role(role), tenant,
                                via=_R.TOKENS)
        if not decision.allowed:
            self.gate.check(caller, principal, _R.TOKENS, _V.CREATE, tenant, name)
            error = decision.error()
            assert error is not None
            raise error
        issued = self._run(caller, principal, "tokens:create", tenant, name,
                           lambda: self.auth.tokens.issue(tenant=tenant, role=role, name=name,
                                                          created_by=principal.id, ttl=ttl_s))
        return {"token": issued.token.get_secret_value(), **asdict(issued.info)}

    def list_tokens(self, caller: Caller, tenant: str | None = None) -> list[dict[str, Any]]:
        principal = self.gate.principal(caller)
        tenants = self.gate.readable_tenants(principal, _R.TOKENS)
        return [asdict(t) for t in self.auth.tokens.list(tenant=tenant)
                if visible({"tenant": t.tenant}, tenants)]

    def revoke_token(self, caller: Caller, token_id: str) -> dict[str, Any]:
        principal = self.gate.principal(caller)
        info = self.auth.tokens.get(token_id)
        self.gate.check(caller, principal, _R.TOKENS, _V.DELETE, info.tenant, token_id)
        return asdict(self._run(caller, principal, "tokens:revoke", info.tenant, token_id,
                                lambda: self.auth.tokens.revoke(token_id)))

    # -- users and sessions -------------------------------------------------------------------
    def create_user(self, caller: Caller, name: str, password: str,
                    tenant: str | None = None) -> dict[str, Any]:
        principal = self.gate.principal(caller)
        tenant = tenant or home_tenant(principal)
        self.gate.check(caller, principal, _R.USERS, _V.CREATE, tenant, name)
        user = self._run(caller, principal, "users:create", tenant, name,
                         lambda: self.auth.users.create(tenant, name, password))
        return user.model_dump(mode="json")

    def list_users(self, caller: Caller, tenant: str | None = None) -> list[dict[str, Any]]:
        tenants = self.gate.readable_tenants(self.gate.principal(caller), _R.USERS)
        return [u.model_dump(mode="json") for u in self.auth.users.list(tenant=tenant)
                if visible({"tenant": u.tenant}, tenants)]

    def delete_user(self, caller: Caller, tenant: str, name: str) -> None:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.USERS, _V.DELETE, tenant, name)
        self._run(caller, principal, "users:delete", tenant, name,
                  lambda: self.auth.users.delete(tenant, name))

    def unlock_user(self, caller: Caller, tenant: str, name: str) -> None:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.USERS, _V.UPDATE, tenant, name)
        self._run(caller, principal, "users:unlock", tenant, name,
                  lambda: self.auth.users.unlock(tenant, name))

    def login(self, caller: Caller, tenant: str, name: str, password: str,
              totp_code: str | None = None) -> dict[str, Any]:
        """A session for a local user (no credentials needed to ask)."""
        actor = f"user:{tenant}/{name}"
        try:
            issued = self.auth.users.login(tenant, name, password, totp_code)
        except NovaCronError as exc:
            self.auth.audit.append(actor=actor, action="login", result=AuditResult.DENIED,
                                   tenant=tenant, request_id=caller.request_id,
                                   detail={"error": exc.code})
            raise
        self.auth.audit.append(actor=actor, action="login", result=AuditResult.SUCCESS,
                               tenant=tenant, request_id=caller.request_id)
        return {"session": issued.token.get_secret_value(), "id": issued.session.id,
                "expires_at": issued.session.expires_at, "mfa": issued.session.mfa}

    def logout(self, caller: Caller) -> None:
        principal = self.gate.principal(caller)
        if principal.credential_id is not None and principal.kind.value == "user":
            self.auth.sessions.revoke(principal.credential_id)

    def begin_totp(self, caller: Caller, tenant: str, name: str,
                   password: str) -> dict[str, str]:
        secret, uri = self.auth.users.begin_totp(tenant, name, password)
        return {"secret": secret, "otpauth_uri": uri}

    def confirm_totp(self, caller: Caller, tenant: str, name: str, password: str,
                     code: str) -> None:
        self.auth.users.confirm_totp(tenant, name, password, code)
        self.auth.audit.append(actor=f"user:{tenant}/{name}", action="users:totp-enable",
                               result=AuditResult.SUCCESS, tenant=tenant,
                               request_id=caller.request_id)

    # -- roles and bindings -------------------------------------------------------------------
    def list_roles(self, caller: Caller) -> list[dict[str, Any]]:
        self.gate.principal(caller)
        return [r.to_data() for r in self.auth.roles.list_roles()]

    def put_role(self, caller: Caller, name: str, permissions: list[str],
                 description: str = "") -> dict[str, Any]:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.ROLES, _V.CREATE, ALL_TENANTS, name)
        role = Role(name, frozenset(Action.parse(p) for p in permissions), description)
        return self._run(caller, principal, "roles:put", ALL_TENANTS, name,
                         lambda: self.auth.roles.put_role(role)).to_data()

    def delete_role(self, caller: Caller, name: str) -> None:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.ROLES, _V.DELETE, ALL_TENANTS, name)
        self._run(caller, principal, "roles:delete", ALL_TENANTS, name,
                  lambda: self.auth.roles.delete_role(name))

    def bind(self, caller: Caller, subject: str, role: str, tenant: str) -> dict[str, Any]:
        principal = self.gate.principal(caller)
        decision = decide_grant(principal, self.auth.roles.get_role(role), tenant)
        if not decision.allowed:
            self.gate.check(caller, principal, _R.BINDINGS, _V.CREATE, tenant, subject)
            error = decision.error()
            assert error is not None
            raise error
        return self._run(caller, principal, "bindings:create", tenant, subject,
                         lambda: self.auth.roles.bind(subject, role, tenant,
                                                      created_by=principal.id)).to_data()

    def unbind(self, caller: Caller, subject: str, role: str, tenant: str) -> None:
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.BINDINGS, _V.DELETE, tenant, subject)
        self._run(caller, principal, "bindings:delete", tenant, subject,
                  lambda: self.auth.roles.unbind(subject, role, tenant))

    def list_bindings(self, caller: Caller, tenant: str | None = None) -> list[dict[str, Any]]:
        tenants = self.gate.readable_tenants(self.gate.principal(caller), _R.BINDINGS)
        return [b.to_data() for b in self.auth.roles.bindings(tenant=tenant)
                if visible({"tenant": b.tenant}, tenants)]

    # -- audit --------------------------------------------------------------------------------
    def audit(self, caller: Caller, since: int = 0,
              tenant: str | None = None) -> list[dict[str, Any]]:
        """Audit entries: every tenant's for admins, each tenant's own for the others."""
        principal = self.gate.principal(caller)
        tenants = self.gate.readable_tenants(principal, _R.AUDIT)
        if tenants is None:
            entries = self.auth.audit.entries(since_seq=since, tenant=tenant)
        else:
            if tenant is not None and tenant not in tenants:
                self.gate.check(caller, principal, _R.AUDIT, _V.READ, tenant)
            wanted = [tenant] if tenant else sorted(tenants)
            if not wanted:
                self.gate.check(caller, principal, _R.AUDIT, _V.READ, home_tenant(principal))
            entries = sorted((e for t in wanted
                              for e in self.auth.audit.entries(since_seq=since, tenant=t)),
                             key=lambda e: e.seq)
        return [e.model_dump(mode="json") for e in entries]

    def verify_audit(self, caller: Caller) -> dict[str, Any]:
        """Whether the audit chain is intact, and where it first breaks if not."""
        principal = self.gate.principal(caller)
        self.gate.check(caller, principal, _R.AUDIT, _V.READ, ALL_TENANTS)
        broken = self.auth.audit.verify()
        return {"intact": broken is None, "first_bad_index": broken}


PUBLIC_METHODS = frozenset(
    name for name in vars(SecuredPlane)
    if not name.startswith("_") and callable(getattr(SecuredPlane, name)))
"""The methods the controller actor serves to callers (the HTTP API and driver scripts)."""
