"""Who is asking and what they may ask: resources, verbs, actions, grants and principals."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from novacron.errors import InvalidRequest

ALL_TENANTS = "*"
"""The tenant of a cluster-wide grant or target (a grant here applies to every tenant)."""

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
"""A tenant name: 1-63 lower-case letters, digits or '-', starting with a letter or digit."""


class Resource(StrEnum):
    """What an action is about."""

    VMS = "vms"
    HOSTS = "hosts"
    MIGRATIONS = "migrations"
    VOLUMES = "volumes"
    TENANTS = "tenants"
    USERS = "users"
    TOKENS = "tokens"
    ROLES = "roles"
    BINDINGS = "bindings"
    AUDIT = "audit"
    PLACEMENT = "placement"
    METRICS = "metrics"


class Verb(StrEnum):
    """What an action does; ``act`` is an operation on an existing object (start, drain...)."""

    READ = "read"
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"
    ACT = "act"


class Action(NamedTuple):
    """A (resource, verb) pair: what a request does, and what a role permits."""

    resource: Resource
    verb: Verb

    def __str__(self) -> str:
        return f"{self.resource.value}:{self.verb.value}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """``"vms:create"`` -> ``Action(VMS, CREATE)``; unknown names raise InvalidRequest."""
        resource, sep, verb = text.partition(":")
        try:
            if not sep:
                raise ValueError(text)
            return cls(Resource(resource), Verb(verb))
        except ValueError:
            raise InvalidRequest(f"not an action: {text[:64]!r} (expected resource:verb)",
                                 details={"resources": [r.value for r in Resource],
                                          "verbs": [v.value for v in Verb]}) from None


ALL_ACTIONS = frozenset(Action(r, v) for r in Resource for v in Verb)


def check_tenant_name(name: str, *, allow_all: bool = False) -> str:
    """Return ``name`` if it is a valid tenant name (or ``*`` when ``allow_all``)."""
    if (allow_all and name == ALL_TENANTS) or TENANT_NAME.fullmatch(name):
        return name
    raise InvalidRequest(f"not a tenant name: {name[:64]!r}",
                         details={"pattern": TENANT_NAME.pattern})


class PrincipalKind(StrEnum):
    """How a principal authenticated."""

    USER = "user"
    TOKEN = "token"
    OIDC = "oidc"


@dataclass(frozen=True, slots=True)
class Grant:
    """A role's permissions in one tenant (or in every tenant when ``tenant`` is ``*``)."""

    tenant: str
    role: str
    permissions: frozenset[Action]

    def covers(self, tenant: str) -> bool:
        """Whether this grant applies to ``tenant`` (a ``*`` target needs a ``*`` grant)."""
        return self.tenant in (ALL_TENANTS, tenant)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller with its grants resolved, as the policy sees it.

    ``id`` is stable and safe to log (``user:acme/alice``, ``token:<id>``, ``oidc:<iss>#<sub>``);
    ``tenant`` is its home tenant (``*`` for a cluster-wide token, None for an OIDC identity
    whose claims name no tenant); ``credential_id`` names the session or token used (never the
    secret), so the HTTP layer can revoke "this session".
    """

    id: str
    kind: PrincipalKind
    tenant: str | None
    grants: tuple[Grant, ...]
    credential_id: str | None = None
    mfa: bool = False
