"""Tenants, RBAC and authentication: the pure core (no HTTP, no Ray).

- :mod:`~novacron.auth.principals` resources, verbs, actions, grants, principals
- :mod:`~novacron.auth.roles` built-in and custom roles, role bindings
- :mod:`~novacron.auth.policy` :func:`decide`, the one policy function
- :mod:`~novacron.auth.authn` :class:`Authenticator`, credentials -> principal
- :mod:`~novacron.auth.tokens`, :mod:`~novacron.auth.sessions`, :mod:`~novacron.auth.users`,
  :mod:`~novacron.auth.passwords`, :mod:`~novacron.auth.totp`, :mod:`~novacron.auth.oidc`
- :mod:`~novacron.auth.tenants`, :mod:`~novacron.auth.quotas`
- :mod:`~novacron.auth.audit` hash-chained audit log; :mod:`~novacron.auth.redact`
- :mod:`~novacron.auth.records` the persistence protocol; :mod:`~novacron.auth.services` wiring
"""

from __future__ import annotations

from novacron.auth.audit import AuditEntry, AuditLog, AuditResult, verify_chain
from novacron.auth.authn import PUBLIC_PATHS, SESSION_COOKIE, Authenticator
from novacron.auth.oidc import OIDCConfig
from novacron.auth.policy import Decision, decide, decide_grant
from novacron.auth.principals import ALL_TENANTS, Action, Principal, Resource, Verb
from novacron.auth.quotas import Quota, Usage
from novacron.auth.quotas import check as check_quota
from novacron.auth.records import AuthRecords, MemoryRecords
from novacron.auth.redact import RedactingFilter, redact
from novacron.auth.roles import Role
from novacron.auth.services import AuthServices
from novacron.auth.tenants import Tenant

__all__ = [
    "ALL_TENANTS",
    "PUBLIC_PATHS",
    "SESSION_COOKIE",
    "Action",
    "AuditEntry",
    "AuditLog",
    "AuditResult",
    "AuthRecords",
    "AuthServices",
    "Authenticator",
    "Decision",
    "MemoryRecords",
    "OIDCConfig",
    "Principal",
    "Quota",
    "RedactingFilter",
    "Resource",
    "Role",
    "Tenant",
    "Usage",
    "Verb",
    "check_quota",
    "decide",
    "decide_grant",
    "redact",
    "verify_chain",
]
