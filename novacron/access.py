"""Who is calling and whether they may: the gate every user-facing call passes.

A :class:`Caller` carries a request's credentials (an ``Authorization`` header value or a session
cookie) and its request id; :class:`Gate` turns it into a :class:`~novacron.auth.Principal` and
decides each action with the one policy function, recording every denial in the audit log.

Objects of a tenant the caller holds no role in answer NotFound (their existence is not
revealed); cluster-wide objects (tenant ``*``) answer Forbidden.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from novacron.auth import (
    ALL_TENANTS,
    Action,
    AuditResult,
    Principal,
    RedactingFilter,
    Resource,
    Verb,
    decide,
)
from novacron.auth.authn import Authenticator
from novacron.errors import Forbidden, NovaCronError, Unauthenticated

log = logging.getLogger("novacron.access")

AuditSink = Callable[..., None]
"""``sink(actor=, action=, result=, tenant=, target=, request_id=, detail=)``."""


@dataclass(frozen=True)
class Caller:
    """The credentials of one request (never logged) and its id."""

    authorization: str | None = field(default=None, repr=False)
    session: str | None = field(default=None, repr=False)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def with_token(cls, token: str) -> Caller:
        """A caller presenting an API token (what the CLI and driver scripts do)."""
        return cls(authorization=f"Bearer {token}")


class Gate:
    """Authenticates callers and decides their actions; audits every denial."""

    def __init__(self, authenticator: Authenticator, audit: AuditSink) -> None:
        self._authenticator = authenticator
        self._audit = audit

    def principal(self, caller: Caller) -> Principal:
        """The authenticated principal of ``caller``; Unauthenticated (audited) otherwise."""
        try:
            return self._authenticator.authenticate(caller.authorization, caller.session)
        except Unauthenticated as exc:
            self._record(actor="anonymous", action="authenticate", result=AuditResult.DENIED,
                         tenant=None, target=None, request_id=caller.request_id,
                         detail={"reason": exc.message})
            raise

    def check(self, caller: Caller, principal: Principal, resource: Resource, verb: Verb,
              tenant: str, target: str | None = None, *,
              hidden: NovaCronError | None = None) -> None:
        """Allow ``resource:verb`` on ``tenant``'s object ``target``, or raise (audited).

        ``hidden`` is the error a missing object would get: an object the caller may not even
        see (another tenant's, or a cluster-wide one) answers exactly that, so a refusal never
        tells whether it exists.
        """
        decision = decide(principal, Action(resource, verb), tenant)
        if decision.allowed:
            return
        self._record(actor=principal.id, action=f"{resource.value}:{verb.value}",
                     result=AuditResult.DENIED, tenant=tenant, target=target,
                     request_id=caller.request_id, detail={"reason": decision.reason})
        if hidden is not None and (not decision.visible or tenant == ALL_TENANTS):
            raise hidden
        if tenant == ALL_TENANTS:
            raise Forbidden(f"not allowed to {verb.value} {resource.value} cluster-wide",
                            details={"action": f"{resource.value}:{verb.value}"})
        error = decision.error()
        assert error is not None
        raise error

    def may(self, principal: Principal, resource: Resource, verb: Verb, tenant: str) -> bool:
        """Whether ``principal`` may (no audit: for filtering what a listing shows)."""
        return decide(principal, Action(resource, verb), tenant).allowed

    def readable_tenants(self, principal: Principal, resource: Resource) -> set[str] | None:
        """The tenants whose ``resource`` the principal may read; None means every tenant."""
        tenants: set[str] = set()
        for grant in principal.grants:
            if Action(resource, Verb.READ) in grant.permissions:
                if grant.tenant == ALL_TENANTS:
                    return None
                tenants.add(grant.tenant)
        return tenants

    def _record(self, **entry: Any) -> None:
        try:
            self._audit(**entry)
        except NovaCronError as exc:  # an audit failure must not hide the denial itself
            log.error("could not audit a denial: %s", exc.message)


def redact_logs() -> None:
    """Scrub secrets (tokens, passwords) from every record the root log handlers write."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


def visible(record: Mapping[str, Any], tenants: set[str] | None) -> bool:
    """Whether a stored object (with a ``tenant`` field) is in ``tenants`` (None: all)."""
    return tenants is None or record.get("tenant", ALL_TENANTS) in tenants
