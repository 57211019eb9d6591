"""Roles (sets of permitted actions), the built-in ones, and bindings of principals to roles.

Built-in roles (cannot be changed or deleted):

- ``admin``: every action. Bound only in tenant ``*``, so it is what the issue calls "admin (all
  tenants)"; a tenant-level administrator is a custom role bound in that tenant.
- ``operator``: manages vms, migrations, volumes and placement (every verb); on hosts only
  ``read`` and ``act`` (drain, maintenance): registering and removing hosts is for admins; reads
  its tenant record and metrics.
- ``viewer``: reads the workload resources of its tenant (vms, hosts, migrations, volumes,
  placement, metrics, the tenant record). Neither operator nor viewer sees users, tokens, roles,
  bindings or the audit log; a custom role can add them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from novacron.auth.principals import (
    ALL_ACTIONS,
    ALL_TENANTS,
    Action,
    Grant,
    Resource,
    Verb,
    check_tenant_name,
)
from novacron.auth.records import AuthRecords, Clock, wall_clock
from novacron.errors import Conflict, InvalidRequest, NotFound

log = logging.getLogger("novacron.auth")

ROLE_KIND = "auth.role"
BINDING_KIND = "auth.binding"
ROLE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

ADMIN = "admin"
OPERATOR = "operator"
VIEWER = "viewer"


@dataclass(frozen=True, slots=True)
class Role:
    """A named set of permitted actions."""

    name: str
    permissions: frozenset[Action]
    description: str = ""

    def to_data(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description,
                "permissions": sorted(str(a) for a in self.permissions)}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> Role:
        return cls(name=data["name"], description=data.get("description", ""),
                   permissions=frozenset(Action.parse(p) for p in data["permissions"]))


def _actions(resources: tuple[Resource, ...], verbs: tuple[Verb, ...]) -> frozenset[Action]:
    return frozenset(Action(r, v) for r in resources for v in verbs)


_WORKLOAD = (Resource.VMS, Resource.HOSTS, Resource.MIGRATIONS, Resource.VOLUMES,
             Resource.PLACEMENT, Resource.METRICS, Resource.TENANTS)
_VIEWER = _actions(_WORKLOAD, (Verb.READ,))
_OPERATOR = (_VIEWER
             | _actions((Resource.VMS, Resource.MIGRATIONS, Resource.VOLUMES, Resource.PLACEMENT),
                        tuple(Verb))
             | {Action(Resource.HOSTS, Verb.ACT)})

BUILTIN_ROLES: dict[str, Role] = {
    ADMIN: Role(ADMIN, ALL_ACTIONS, "every action in every tenant"),
    OPERATOR: Role(OPERATOR, _OPERATOR, "manage vms, migrations, volumes, placement; drain hosts"),
    VIEWER: Role(VIEWER, _VIEWER, "read the workload resources of a tenant"),
}


@dataclass(frozen=True, slots=True)
class RoleBinding:
    """``principal`` holds ``role`` in ``tenant`` (``*``: every tenant)."""

    principal: str
    role: str
    tenant: str
    created_by: str
    created_at: float

    @property
    def key(self) -> str:
        return binding_key(self.principal, self.role, self.tenant)

    def to_data(self) -> dict[str, Any]:
        return {"principal": self.principal, "role": self.role, "tenant": self.tenant,
                "created_by": self.created_by, "created_at": self.created_at}

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> RoleBinding:
        return cls(principal=data["principal"], role=data["role"], tenant=data["tenant"],
                   created_by=data["created_by"], created_at=data["created_at"])


def binding_key(principal: str, role: str, tenant: str) -> str:
    # Tenant and role names hold no '/', so the principal (last) may.
    return f"{tenant}/{role}/{principal}"


def check_role_scope(role: str, tenant: str) -> None:
    """Refuse a grant of ``admin`` anywhere but ``*`` (it would read as cluster admin)."""
    check_tenant_name(tenant, allow_all=True)
    if role == ADMIN and tenant != ALL_TENANTS:
        raise InvalidRequest("the admin role covers every tenant: grant it in tenant '*' "
                             "(use a custom role for a tenant administrator)",
                             details={"role": role, "tenant": tenant})


class RoleStore:
    """Custom roles and role bindings in :class:`AuthRecords`; resolves a principal's grants."""

    def __init__(self, records: AuthRecords, *, clock: Clock = wall_clock) -> None:
        self._records = records
        self._clock = clock

    def get_role(self, name: str) -> Role:
        if name in BUILTIN_ROLES:
            return BUILTIN_ROLES[name]
        rec = self._records.get(ROLE_KIND, name)
        if rec is None:
            raise NotFound(f"no role {name[:64]!r}")
        return Role.from_data(rec.data)

    def list_roles(self) -> list[Role]:
        custom = [Role.from_data(r.data) for r in self._records.all(ROLE_KIND)]
        return [*BUILTIN_ROLES.values(), *sorted(custom, key=lambda r: r.name)]

    def put_role(self, role: Role) -> Role:
        """Create or replace a custom role (built-in names are refused)."""
        if not ROLE_NAME.fullmatch(role.name):
            raise InvalidRequest(f"not a role name: {role.name[:64]!r}",
                                 details={"pattern": ROLE_NAME.pattern})
        if role.name in BUILTIN_ROLES:
            raise Conflict(f"{role.name!r} is a built-in role and cannot be changed")
        self._records.put(ROLE_KIND, role.name, role.to_data())
        log.info("role %s saved with %d permissions", role.name, len(role.permissions))
        return role

    def delete_role(self, name: str) -> None:
        """Delete a custom role that nobody is bound to."""
        if name in BUILTIN_ROLES:
            raise Conflict(f"{name!r} is a built-in role and cannot be deleted")
        rec = self._records.get(ROLE_KIND, name)
        if rec is None:
            raise NotFound(f"no role {name[:64]!r}")
        bound = [b.principal for b in self.bindings() if b.role == name]
        if bound:
            raise Conflict(f"role {name!r} is still bound", details={"principals": bound[:20]})
        self._records.delete(ROLE_KIND, name, expected_revision=rec.revision)

    def bind(self, principal: str, role: str, tenant: str, *, created_by: str) -> RoleBinding:
        """Bind ``principal`` to ``role`` in ``tenant`` (AlreadyExists if it is)."""
        check_role_scope(role, tenant)
        self.get_role(role)
        binding = RoleBinding(principal, role, tenant, created_by, self._clock())
        self._records.create(BINDING_KIND, binding.key, binding.to_data())
        log.info("bound %s to role %s in tenant %s", principal, role, tenant)
        return binding

    def unbind(self, principal: str, role: str, tenant: str) -> None:
        try:
            self._records.delete(BINDING_KIND, binding_key(principal, role, tenant))
        except NotFound:
            raise NotFound("no such role binding") from None
        log.info("unbound %s from role %s in tenant %s", principal, role, tenant)

    def bindings(self, *, principal: str | None = None,
                 tenant: str | None = None) -> list[RoleBinding]:
        where = {f: v for f, v in (("principal", principal), ("tenant", tenant)) if v is not None}
        return [RoleBinding.from_data(r.data) for r in self._records.all(BINDING_KIND, where=where)]

    def grant(self, role: str, tenant: str) -> Grant:
        """The grant of ``role`` in ``tenant`` (NotFound for an unknown role)."""
        check_role_scope(role, tenant)
        return Grant(tenant, role, self.get_role(role).permissions)

    def grants_for(self, principal: str) -> tuple[Grant, ...]:
        """Every grant bound to ``principal``; bindings to deleted roles are skipped."""
        grants = []
        for b in self.bindings(principal=principal):
            try:
                grants.append(self.grant(b.role, b.tenant))
            except (NotFound, InvalidRequest):
                log.warning("ignoring binding of %s to unusable role %s", principal, b.role)
        return tuple(grants)
