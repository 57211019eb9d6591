"""One entry point from request credentials to a :class:`Principal`, for the FastAPI dependency.

``Authorization: Bearer nc_...`` is an API token, ``Bearer ncs_...`` (or the session cookie) a
login session, ``Bearer <header>.<payload>.<signature>`` an OIDC JWT. Anything else, or nothing,
is :class:`~novacron.errors.Unauthenticated` (401), except on :data:`PUBLIC_PATHS`. A cookie-borne
session needs CSRF protection in the HTTP layer (SameSite=Strict and a custom header on mutations).
"""

from __future__ import annotations

from novacron.auth.oidc import OIDCVerifier
from novacron.auth.principals import Principal, PrincipalKind
from novacron.auth.roles import RoleStore
from novacron.auth.sessions import SessionService
from novacron.auth.tenants import TenantStore
from novacron.auth.tokens import TokenService
from novacron.auth.users import UserService
from novacron.errors import NotFound, Unauthenticated

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
SESSION_COOKIE = "novacron_session"
_MAX_HEADER = 16 * 1024


class Authenticator:
    """Resolves a request's credentials to a principal with its current grants."""

    def __init__(self, *, tokens: TokenService, sessions: SessionService, users: UserService,
                 tenants: TenantStore, roles: RoleStore,
                 oidc: OIDCVerifier | None = None) -> None:
        self._tokens = tokens
        self._sessions = sessions
        self._users = users
        self._tenants = tenants
        self._roles = roles
        self._oidc = oidc

    def authenticate(self, authorization: str | None,
                     session_cookie: str | None = None) -> Principal:
        """The caller of a request (the Authorization header wins over the cookie)."""
        if authorization:
            scheme, _, credential = authorization.strip().partition(" ")
            credential = credential.strip()
            if scheme.lower() != "bearer" or not credential or len(credential) > _MAX_HEADER:
                raise Unauthenticated("unsupported authorization (use: Bearer <token>)")
            if credential.startswith("nc_"):
                return self._tokens.authenticate(credential)
            if credential.startswith("ncs_"):
                return self._session(credential)
            if credential.count(".") == 2:
                if self._oidc is None:
                    raise Unauthenticated("OIDC bearer tokens are not enabled")
                return self._oidc.authenticate(credential)
            raise Unauthenticated("malformed bearer token")
        if session_cookie:
            return self._session(session_cookie)
        raise Unauthenticated("authentication required")

    def _session(self, raw: str) -> Principal:
        session = self._sessions.validate(raw)
        if not self._users.is_active(session.user):
            raise Unauthenticated("session ended")
        try:
            require_mfa = self._tenants.get(session.tenant).require_mfa
        except NotFound:
            raise Unauthenticated("session ended") from None
        if require_mfa and not session.mfa:
            raise Unauthenticated("tenant requires TOTP: log in again",
                                  details={"mfa_required": True})
        return Principal(session.user, PrincipalKind.USER, session.tenant,
                         self._roles.grants_for(session.user), credential_id=session.id,
                         mfa=session.mfa)
