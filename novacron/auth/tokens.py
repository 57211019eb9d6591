"""API tokens ``nc_<id>_<secret>``: shown once, stored as a hash, expiring, revocable, and scoped
to one tenant and one role (the token is its own principal, ``token:<id>``)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import SecretStr

from novacron.auth import credentials
from novacron.auth.principals import ALL_TENANTS, Grant, Principal, PrincipalKind
from novacron.auth.records import AuthRecords, Clock, wall_clock
from novacron.auth.roles import ADMIN, RoleStore
from novacron.errors import AlreadyExists, InvalidRequest, NotFound, Unauthenticated

log = logging.getLogger("novacron.auth")

TOKEN_KIND = "auth.token"
META_KIND = "auth.meta"
PREFIX = "nc"
DAY = 86400.0
DEFAULT_TTL = 90 * DAY
MAX_TTL = 366 * DAY


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What is known about a token, minus its secret (safe to list and log)."""

    id: str
    name: str
    tenant: str
    role: str
    created_by: str
    created_at: float
    expires_at: float
    revoked_at: float | None = None

    @property
    def principal_id(self) -> str:
        return f"token:{self.id}"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A new token: ``token`` is shown to its owner once and never stored."""

    token: SecretStr
    info: TokenInfo


class TokenService:
    """Issues, authenticates, lists and revokes API tokens."""

    def __init__(self, records: AuthRecords, roles: RoleStore, *, clock: Clock = wall_clock,
                 max_ttl: float = MAX_TTL) -> None:
        self._records = records
        self._roles = roles
        self._clock = clock
        self._max_ttl = max_ttl

    def issue(self, *, tenant: str, role: str, name: str, created_by: str,
              ttl: float = DEFAULT_TTL) -> IssuedToken:
        """A new token for ``role`` in ``tenant``.

        The caller first checks ``decide_grant(creator, role, tenant, Resource.TOKENS)``.
        """
        if not 0 < ttl <= self._max_ttl:
            raise InvalidRequest(f"token lifetime must be within (0, {self._max_ttl:.0f}] s",
                                 details={"ttl": ttl})
        if not 1 <= len(name) <= 128:
            raise InvalidRequest("token name must be 1-128 characters")
        self._roles.grant(role, tenant)  # validates the role and its scope
        cred_id, digest, raw = credentials.mint(PREFIX)
        now = self._clock()
        info = TokenInfo(cred_id, name, tenant, role, created_by, now, now + ttl)
        self._records.create(TOKEN_KIND, cred_id, {**asdict(info), "digest": digest})
        log.info("issued API token %s (%s in %s) for %s", cred_id, role, tenant, created_by)
        return IssuedToken(raw, info)

    def authenticate(self, raw: str) -> Principal:
        """The principal of a presented token; Unauthenticated if malformed, unknown, wrong,
        expired or revoked."""
        cred_id, secret = credentials.parse(PREFIX, raw, "API token")
        rec = self._records.get(TOKEN_KIND, cred_id)
        if rec is None or not credentials.matches(rec.data["digest"], cred_id, secret):
            raise Unauthenticated("invalid API token")
        info = _info(rec.data)
        if info.revoked_at is not None:
            raise Unauthenticated("API token revoked", details={"token_id": cred_id})
        if self._clock() >= info.expires_at:
            raise Unauthenticated("API token expired", details={"token_id": cred_id})
        grants: tuple[Grant, ...]
        try:
            grants = (self._roles.grant(info.role, info.tenant),)
        except (NotFound, InvalidRequest):
            log.warning("API token %s refers to unusable role %s", cred_id, info.role)
            grants = ()
        return Principal(info.principal_id, PrincipalKind.TOKEN, info.tenant, grants,
                         credential_id=cred_id)

    def get(self, token_id: str) -> TokenInfo:
        rec = self._records.get(TOKEN_KIND, token_id)
        if rec is None:
            raise NotFound("no such API token")
        return _info(rec.data)

    def list(self, tenant: str | None = None) -> list[TokenInfo]:
        where = None if tenant is None else {"tenant": tenant}
        return [_info(r.data) for r in self._records.all(TOKEN_KIND, where=where)]

    def revoke(self, token_id: str) -> TokenInfo:
        """Revoke a token (idempotent; it answers 401 from now on)."""
        rec = self._records.get(TOKEN_KIND, token_id)
        if rec is None:
            raise NotFound("no such API token")
        if rec.data.get("revoked_at") is None:
            rec = self._records.put(TOKEN_KIND, token_id, {**rec.data, "revoked_at": self._clock()},
                                    expected_revision=rec.revision)
            log.info("revoked API token %s", token_id)
        return _info(rec.data)


def bootstrap_admin_token(records: AuthRecords, tokens: TokenService, *,
                          ttl: float = DEFAULT_TTL) -> IssuedToken | None:
    """On first start, issue an ``admin`` token for every tenant; None if ever done before.

    Safe under races: the marker record is created after the token, and a loser revokes its own.
    """
    if records.get(META_KIND, "bootstrap") is not None:
        return None
    issued = tokens.issue(tenant=ALL_TENANTS, role=ADMIN, name="bootstrap admin",
                          created_by="system:bootstrap", ttl=ttl)
    try:
        records.create(META_KIND, "bootstrap", {"token_id": issued.info.id,
                                                "created_at": issued.info.created_at})
    except AlreadyExists:
        tokens.revoke(issued.info.id)
        return None
    log.warning("created the bootstrap admin token %s", issued.info.id)
    return issued


def _info(data: dict[str, Any]) -> TokenInfo:
    return TokenInfo(id=data["id"], name=data["name"], tenant=data["tenant"], role=data["role"],
                     created_by=data["created_by"], created_at=data["created_at"],
                     expires_at=data["expires_at"], revoked_at=data.get("revoked_at"))
