"""Every auth service wired to one :class:`AuthRecords`: what the HTTP layer builds at start."""

from __future__ import annotations

from dataclasses import dataclass

from argon2 import Parameters
from pydantic import SecretStr

from novacron.auth.audit import AuditLog
from novacron.auth.authn import Authenticator
from novacron.auth.oidc import JWKSCache, OIDCConfig, OIDCVerifier
from novacron.auth.passwords import DEFAULT_PARAMETERS, Passwords
from novacron.auth.records import AuthRecords, Clock, wall_clock
from novacron.auth.roles import RoleStore
from novacron.auth.sessions import DEFAULT_TTL as SESSION_TTL
from novacron.auth.sessions import SessionService
from novacron.auth.tenants import TenantStore
from novacron.auth.tokens import TokenService, bootstrap_admin_token
from novacron.auth.users import LockoutPolicy, UserService


@dataclass(frozen=True, slots=True)
class AuthServices:
    """The auth core of one control plane."""

    records: AuthRecords
    tenants: TenantStore
    roles: RoleStore
    tokens: TokenService
    sessions: SessionService
    users: UserService
    audit: AuditLog
    authenticator: Authenticator

    @classmethod
    def create(cls, records: AuthRecords, *, clock: Clock = wall_clock,
               password_parameters: Parameters = DEFAULT_PARAMETERS,
               lockout: LockoutPolicy | None = None, session_ttl: float = SESSION_TTL,
               oidc: OIDCConfig | None = None, jwks: JWKSCache | None = None) -> AuthServices:
        tenants = TenantStore(records, clock=clock)
        roles = RoleStore(records, clock=clock)
        tokens = TokenService(records, roles, clock=clock)
        sessions = SessionService(records, clock=clock, ttl=session_ttl)
        users = UserService(records, Passwords(password_parameters), sessions, tenants,
                            lockout=lockout, clock=clock)
        verifier = None if oidc is None else OIDCVerifier(oidc, roles, jwks)
        return cls(records, tenants, roles, tokens, sessions, users, AuditLog(records, clock=clock),
                   Authenticator(tokens=tokens, sessions=sessions, users=users, tenants=tenants,
                                 roles=roles, oidc=verifier))

    def first_start(self) -> SecretStr | None:
        """Create the default tenant and, once ever, the admin token (returned to show once)."""
        self.tenants.ensure()
        issued = bootstrap_admin_token(self.records, self.tokens)
        return None if issued is None else issued.token
