"""The policy function as a table, plus roles, bindings and escalation checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novacron.auth.policy import decide, decide_grant
from novacron.auth.principals import (
    ALL_ACTIONS,
    ALL_TENANTS,
    Action,
    Grant,
    Principal,
    PrincipalKind,
    Resource,
    Verb,
)
from novacron.auth.records import MemoryRecords
from novacron.auth.roles import ADMIN, BUILTIN_ROLES, OPERATOR, VIEWER, Role, RoleStore
from novacron.errors import Conflict, Forbidden, InvalidRequest, NotFound


def principal(*grants: tuple[str, Role]) -> Principal:
    return Principal("user:t/p", PrincipalKind.USER, "acme",
                     tuple(Grant(t, r.name, r.permissions) for t, r in grants))


AUDITOR = Role("auditor", frozenset({Action(Resource.AUDIT, Verb.READ)}))
TENANT_ADMIN = Role("tenant-admin", ALL_ACTIONS)

ADMIN_P = principal((ALL_TENANTS, BUILTIN_ROLES[ADMIN]))
OPERATOR_P = principal(("acme", BUILTIN_ROLES[OPERATOR]))
VIEWER_P = principal(("acme", BUILTIN_ROLES[VIEWER]))
GLOBAL_VIEWER_P = principal((ALL_TENANTS, BUILTIN_ROLES[VIEWER]))
AUDITOR_P = principal(("acme", AUDITOR))
NOBODY_P = principal()
MIXED_P = principal(("acme", BUILTIN_ROLES[VIEWER]), ("globex", BUILTIN_ROLES[OPERATOR]))

ALLOW, FORBID, HIDE = "allow", "403", "404"

TABLE = [
    # principal, action, target tenant, outcome
    (ADMIN_P, "vms:delete", "globex", ALLOW),
    (ADMIN_P, "tenants:create", ALL_TENANTS, ALLOW),
    (ADMIN_P, "audit:read", "acme", ALLOW),
    (ADMIN_P, "hosts:delete", "acme", ALLOW),
    (OPERATOR_P, "vms:create", "acme", ALLOW),
    (OPERATOR_P, "vms:act", "acme", ALLOW),
    (OPERATOR_P, "vms:delete", "acme", ALLOW),
    (OPERATOR_P, "migrations:create", "acme", ALLOW),
    (OPERATOR_P, "migrations:act", "acme", ALLOW),
    (OPERATOR_P, "volumes:delete", "acme", ALLOW),
    (OPERATOR_P, "placement:act", "acme", ALLOW),
    (OPERATOR_P, "hosts:read", "acme", ALLOW),
    (OPERATOR_P, "hosts:act", "acme", ALLOW),
    (OPERATOR_P, "metrics:read", "acme", ALLOW),
    (OPERATOR_P, "tenants:read", "acme", ALLOW),
    (OPERATOR_P, "hosts:create", "acme", FORBID),
    (OPERATOR_P, "hosts:delete", "acme", FORBID),
    (OPERATOR_P, "hosts:update", "acme", FORBID),
    (OPERATOR_P, "tenants:update", "acme", FORBID),
    (OPERATOR_P, "users:create", "acme", FORBID),
    (OPERATOR_P, "tokens:create", "acme", FORBID),
    (OPERATOR_P, "bindings:create", "acme", FORBID),
    (OPERATOR_P, "roles:read", "acme", FORBID),
    (OPERATOR_P, "audit:read", "acme", FORBID),
    (OPERATOR_P, "vms:read", "globex", HIDE),
    (OPERATOR_P, "vms:create", "globex", HIDE),
    (OPERATOR_P, "vms:read", ALL_TENANTS, HIDE),
    (OPERATOR_P, "tenants:create", ALL_TENANTS, HIDE),
    (VIEWER_P, "vms:read", "acme", ALLOW),
    (VIEWER_P, "hosts:read", "acme", ALLOW),
    (VIEWER_P, "metrics:read", "acme", ALLOW),
    (VIEWER_P, "vms:create", "acme", FORBID),
    (VIEWER_P, "vms:act", "acme", FORBID),
    (VIEWER_P, "hosts:act", "acme", FORBID),
    (VIEWER_P, "users:read", "acme", FORBID),
    (VIEWER_P, "tokens:read", "acme", FORBID),
    (VIEWER_P, "vms:read", "globex", HIDE),
    (GLOBAL_VIEWER_P, "vms:read", "globex", ALLOW),
    (GLOBAL_VIEWER_P, "vms:read", ALL_TENANTS, ALLOW),
    (GLOBAL_VIEWER_P, "vms:delete", "globex", FORBID),
    (AUDITOR_P, "audit:read", "acme", ALLOW),
    (AUDITOR_P, "vms:read", "acme", FORBID),
    (AUDITOR_P, "audit:read", "globex", HIDE),
    (MIXED_P, "vms:create", "globex", ALLOW),
    (MIXED_P, "vms:create", "acme", FORBID),
    (MIXED_P, "vms:read", "acme", ALLOW),
    (MIXED_P, "vms:read", "initech", HIDE),
    (NOBODY_P, "vms:read", "acme", HIDE),
    (NOBODY_P, "metrics:read", ALL_TENANTS, HIDE),
]


@pytest.mark.parametrize(("who", "action", "tenant", "outcome"), TABLE)
def test_decide_table(who: Principal, action: str, tenant: str, outcome: str) -> None:
    decision = decide(who, Action.parse(action), tenant)
    assert decision.allowed is (outcome == ALLOW), decision.reason
    error = decision.error()
    if outcome == ALLOW:
        assert error is None
    elif outcome == FORBID:
        assert isinstance(error, Forbidden)
        assert error.details["action"] == action
    else:
        # Another tenant's objects are not revealed: the same answer as a missing object.
        assert isinstance(error, NotFound)
        assert error.message == "not found"


def test_builtin_roles_match_the_documented_shape() -> None:
    viewer, operator = BUILTIN_ROLES[VIEWER], BUILTIN_ROLES[OPERATOR]
    assert BUILTIN_ROLES[ADMIN].permissions == ALL_ACTIONS
    assert all(a.verb == Verb.READ for a in viewer.permissions)
    assert viewer.permissions < operator.permissions
    security = {Resource.USERS, Resource.TOKENS, Resource.ROLES, Resource.BINDINGS,
                Resource.AUDIT}
    assert not any(a.resource in security for a in operator.permissions)
    hosts = {a.verb for a in operator.permissions if a.resource == Resource.HOSTS}
    assert hosts == {Verb.READ, Verb.ACT}


actions = st.sampled_from(sorted(ALL_ACTIONS))
tenants = st.sampled_from(["acme", "globex", ALL_TENANTS])
grants = st.lists(st.tuples(tenants, st.sampled_from(sorted(BUILTIN_ROLES))), max_size=4)


@given(grants, actions, tenants)
def test_decide_allows_only_through_a_covering_grant(
        granted: list[tuple[str, str]], action: Action, target: str) -> None:
    who = principal(*((t, BUILTIN_ROLES[r]) for t, r in granted))
    decision = decide(who, action, target)
    expected = any((t in (ALL_TENANTS, target)) and action in BUILTIN_ROLES[r].permissions
                   for t, r in granted)
    assert decision.allowed is expected
    assert decision.visible is (expected or any(t in (ALL_TENANTS, target) for t, _ in granted))


def test_action_parse_refuses_unknown_names() -> None:
    assert Action.parse("vms:act") == Action(Resource.VMS, Verb.ACT)
    assert str(Action(Resource.HOSTS, Verb.READ)) == "hosts:read"
    for bad in ("vms", "vms:fly", "ships:read", ":", ""):
        with pytest.raises(InvalidRequest):
            Action.parse(bad)


# --- escalation -------------------------------------------------------------------------------

BINDER = Role("binder", frozenset({Action(Resource.BINDINGS, Verb.CREATE),
                                   Action(Resource.VMS, Verb.READ)}))


def test_decide_grant_needs_the_permission_and_every_granted_permission() -> None:
    tenant_admin = principal(("acme", TENANT_ADMIN))
    assert decide_grant(tenant_admin, BUILTIN_ROLES[OPERATOR], "acme").allowed
    assert decide_grant(tenant_admin, BUILTIN_ROLES[VIEWER], "acme",
                        via=Resource.TOKENS).allowed
    # Not in another tenant, and not cluster-wide.
    assert not decide_grant(tenant_admin, BUILTIN_ROLES[VIEWER], "globex").visible
    assert not decide_grant(tenant_admin, BUILTIN_ROLES[ADMIN], ALL_TENANTS).allowed
    # Holding bindings:create is not enough to hand out more than one holds.
    binder = principal(("acme", BINDER))
    denied = decide_grant(binder, BUILTIN_ROLES[OPERATOR], "acme")
    assert not denied.allowed
    assert denied.visible
    assert "lacks, such as hosts:act" in denied.reason
    assert decide_grant(binder, Role("reader", frozenset({Action(Resource.VMS, Verb.READ)})),
                        "acme").allowed
    # An operator cannot bind anyone at all.
    assert not decide_grant(OPERATOR_P, BUILTIN_ROLES[VIEWER], "acme").allowed
    assert decide_grant(ADMIN_P, BUILTIN_ROLES[ADMIN], ALL_TENANTS).allowed
    with pytest.raises(InvalidRequest):
        decide_grant(ADMIN_P, BUILTIN_ROLES[ADMIN], "acme")


# --- role store ---------------------------------------------------------------------------------

def test_role_store_custom_roles_and_bindings() -> None:
    roles = RoleStore(MemoryRecords(), clock=lambda: 100.0)
    roles.put_role(AUDITOR)
    assert roles.get_role("auditor") == AUDITOR
    assert [r.name for r in roles.list_roles()] == [ADMIN, OPERATOR, VIEWER, "auditor"]
    binding = roles.bind("user:acme/alice", "auditor", "acme", created_by="token:x")
    roles.bind("user:acme/alice", VIEWER, "acme", created_by="token:x")
    roles.bind("user:acme/bob", OPERATOR, "acme", created_by="token:x")
    assert binding.created_at == 100.0
    granted = roles.grants_for("user:acme/alice")
    assert {(g.tenant, g.role) for g in granted} == {("acme", "auditor"), ("acme", VIEWER)}
    assert len(roles.bindings(tenant="acme")) == 3
    with pytest.raises(Conflict):
        roles.delete_role("auditor")
    roles.unbind("user:acme/alice", "auditor", "acme")
    roles.delete_role("auditor")
    assert {g.role for g in roles.grants_for("user:acme/alice")} == {VIEWER}
    with pytest.raises(NotFound):
        roles.unbind("user:acme/alice", "auditor", "acme")


def test_role_store_refusals() -> None:
    roles = RoleStore(MemoryRecords())
    with pytest.raises(Conflict):
        roles.put_role(Role(ADMIN, frozenset()))
    with pytest.raises(Conflict):
        roles.delete_role(VIEWER)
    with pytest.raises(InvalidRequest):
        roles.put_role(Role("Bad Name", frozenset()))
    with pytest.raises(NotFound):
        roles.bind("user:acme/a", "ghost", "acme", created_by="x")
    with pytest.raises(InvalidRequest):
        roles.bind("user:acme/a", ADMIN, "acme", created_by="x")
    with pytest.raises(InvalidRequest):
        roles.bind("user:acme/a", VIEWER, "Not A Tenant", created_by="x")
    roles.bind("user:acme/a", VIEWER, "acme", created_by="x")
    with pytest.raises(Conflict):
        roles.bind("user:acme/a", VIEWER, "acme", created_by="x")


def test_bindings_to_a_role_deleted_behind_our_back_are_skipped() -> None:
    records = MemoryRecords()
    roles = RoleStore(records)
    roles.put_role(AUDITOR)
    roles.bind("user:acme/a", "auditor", "acme", created_by="x")
    records.delete("auth.role", "auditor", None)
    assert roles.grants_for("user:acme/a") == ()
