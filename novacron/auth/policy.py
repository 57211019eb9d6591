"""The one policy function: may this principal do this action in this tenant? Pure, deny by default.

The HTTP layer calls :func:`decide` for every request with the tenant that owns the target (for a
create: the tenant it will belong to; for a list: the tenant listed; ``*`` for cluster-wide
operations such as creating tenants or changing quotas), audits a denial, then raises
:meth:`Decision.error`: 404 when the principal holds nothing in that tenant (another tenant's
objects are not revealed), 403 when it is a member lacking the permission.
"""

from __future__ import annotations

from dataclasses import dataclass

from novacron.auth.principals import Action, Principal, Resource, Verb
from novacron.auth.roles import Role, check_role_scope
from novacron.errors import Forbidden, NotFound, NovaCronError


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`; ``visible`` is whether the target tenant may be revealed."""

    allowed: bool
    action: Action
    tenant: str
    reason: str
    visible: bool

    def error(self) -> NovaCronError | None:
        """The error to answer a denied request with (None when allowed)."""
        if self.allowed:
            return None
        if not self.visible:
            return NotFound("not found")
        return Forbidden(f"not allowed to {self.action} in tenant {self.tenant}",
                         details={"action": str(self.action), "tenant": self.tenant,
                                  "reason": self.reason})


def permissions_in(principal: Principal, tenant: str) -> frozenset[Action]:
    """Everything ``principal`` may do in ``tenant`` (grants there and grants in ``*``)."""
    perms: frozenset[Action] = frozenset()
    for grant in principal.grants:
        if grant.covers(tenant):
            perms |= grant.permissions
    return perms


def decide(principal: Principal, action: Action, target_tenant: str) -> Decision:
    """Allow ``action`` on ``target_tenant`` iff a grant covering that tenant permits it."""
    for grant in principal.grants:
        if grant.covers(target_tenant) and action in grant.permissions:
            return Decision(True, action, target_tenant,
                            f"role {grant.role} in tenant {grant.tenant}", visible=True)
    member = any(g.covers(target_tenant) for g in principal.grants)
    reason = "no role permits it" if member else "no role in this tenant"
    return Decision(False, action, target_tenant, reason, visible=member)


def decide_grant(principal: Principal, role: Role, tenant: str,
                 via: Resource = Resource.BINDINGS) -> Decision:
    """May ``principal`` hand out ``role`` in ``tenant`` (a binding, or a token with ``via``)?

    Besides ``<via>:create`` in that tenant, every permission of the role must already be the
    principal's own there, so nobody can grant more than they hold (no privilege escalation).
    Granting ``admin`` outside tenant ``*`` is bad input (InvalidRequest), not a denial.
    """
    check_role_scope(role.name, tenant)
    decision = decide(principal, Action(via, Verb.CREATE), tenant)
    if not decision.allowed:
        return decision
    missing = role.permissions - permissions_in(principal, tenant)
    if missing:
        shown = ", ".join(sorted(str(a) for a in missing)[:5])
        return Decision(False, decision.action, tenant,
                        f"role {role.name} holds {len(missing)} permissions the granter "
                        f"lacks, such as {shown}",
                        visible=True)
    return decision
