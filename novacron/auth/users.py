"""Local users: argon2id passwords, lockout after repeated failures, optional or per-tenant
mandatory TOTP, and login into a session.

Every refused login says only "invalid credentials" (unknown user, disabled, locked or wrong
password alike, and each costs one password hash), so neither the message nor the timing tells
which; the reason goes to the log. Only after a correct password does the answer say that a TOTP
code is missing or wrong, or that the tenant requires TOTP enrollment first (done with the
password: :meth:`UserService.begin_totp` then :meth:`UserService.confirm_totp`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from pydantic import BaseModel, ConfigDict

from novacron.auth import totp
from novacron.auth.passwords import Passwords
from novacron.auth.principals import TENANT_NAME
from novacron.auth.records import AuthRecords, Clock, Record, wall_clock
from novacron.auth.sessions import IssuedSession, SessionService
from novacron.auth.tenants import TenantStore
from novacron.errors import (
    AlreadyExists,
    Conflict,
    InvalidRequest,
    NotFound,
    RevisionMismatch,
    Unauthenticated,
)

log = logging.getLogger("novacron.auth")

USER_KIND = "auth.user"
USER_NAME = re.compile(r"^[a-z0-9][a-z0-9._@+-]{0,127}$")
_CAS_ATTEMPTS = 8


@dataclass(frozen=True, slots=True)
class LockoutPolicy:
    """``max_failures`` failed attempts within ``window`` seconds lock for ``duration`` seconds."""

    max_failures: int = 5
    window: float = 900.0
    duration: float = 900.0


class UserInfo(BaseModel):
    """A user as shown to admins (no hash, no TOTP secret)."""

    model_config = ConfigDict(frozen=True)

    tenant: str
    name: str
    principal_id: str
    totp_enabled: bool
    disabled: bool
    locked_until: float | None
    created_at: float


class _StoredUser(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str
    name: str
    password_hash: str
    totp_secret: str | None = None
    totp_pending: str | None = None
    totp_last_step: int | None = None
    failures: list[float] = []
    locked_until: float | None = None
    disabled: bool = False
    created_at: float

    def info(self) -> UserInfo:
        return UserInfo(tenant=self.tenant, name=self.name,
                        principal_id=user_principal_id(self.tenant, self.name),
                        totp_enabled=self.totp_secret is not None, disabled=self.disabled,
                        locked_until=self.locked_until, created_at=self.created_at)


def user_principal_id(tenant: str, name: str) -> str:
    return f"user:{tenant}/{name}"


def _invalid() -> Unauthenticated:
    return Unauthenticated("invalid credentials")


class UserService:
    """Local users of every tenant, keyed ``<tenant>/<name>``."""

    def __init__(self, records: AuthRecords, passwords: Passwords, sessions: SessionService,
                 tenants: TenantStore, *, lockout: LockoutPolicy | None = None,
                 clock: Clock = wall_clock, issuer: str = "NovaCron") -> None:
        self._records = records
        self._passwords = passwords
        self._sessions = sessions
        self._tenants = tenants
        self._lockout = lockout or LockoutPolicy()
        self._clock = clock
        self._issuer = issuer

    # --- administration ---------------------------------------------------------------------

    def create(self, tenant: str, name: str, password: str) -> UserInfo:
        self._tenants.get(tenant)
        if not USER_NAME.fullmatch(name):
            raise InvalidRequest(f"not a user name: {name[:64]!r}",
                                 details={"pattern": USER_NAME.pattern})
        user = _StoredUser(tenant=tenant, name=name, password_hash=self._passwords.hash(password),
                           created_at=self._clock())
        try:
            self._records.create(USER_KIND, _key(tenant, name), user.model_dump())
        except AlreadyExists:
            raise AlreadyExists(f"user {name!r} already exists in tenant {tenant!r}") from None
        log.info("created user %s/%s", tenant, name)
        return user.info()

    def get(self, tenant: str, name: str) -> UserInfo:
        return self._load(tenant, name)[1].info()

    def list(self, tenant: str | None = None) -> list[UserInfo]:
        where = None if tenant is None else {"tenant": tenant}
        return [_StoredUser.model_validate(r.data).info()
                for r in self._records.all(USER_KIND, where=where)]

    def set_password(self, tenant: str, name: str, password: str) -> None:
        """Replace the password and end every session of the user."""
        new_hash = self._passwords.hash(password)
        self._update(tenant, name, lambda u: u.model_copy(update={
            "password_hash": new_hash, "failures": [], "locked_until": None}))
        self._sessions.revoke_user(user_principal_id(tenant, name))

    def set_disabled(self, tenant: str, name: str, disabled: bool) -> None:
        """Disable (ending every session) or re-enable a user."""
        self._update(tenant, name, lambda u: u.model_copy(update={"disabled": disabled}))
        if disabled:
            self._sessions.revoke_user(user_principal_id(tenant, name))

    def unlock(self, tenant: str, name: str) -> None:
        self._update(tenant, name, lambda u: u.model_copy(update={"failures": [],
                                                                  "locked_until": None}))

    def reset_totp(self, tenant: str, name: str) -> None:
        """Remove the user's TOTP (a lost phone); they enroll again at the next login."""
        self._update(tenant, name, lambda u: u.model_copy(update={
            "totp_secret": None, "totp_pending": None, "totp_last_step": None}))

    def delete(self, tenant: str, name: str) -> None:
        rec, _ = self._load(tenant, name)
        self._records.delete(USER_KIND, rec.key)
        self._sessions.revoke_user(user_principal_id(tenant, name))
        log.info("deleted user %s/%s", tenant, name)

    def is_active(self, principal_id: str) -> bool:
        """Whether ``user:<tenant>/<name>`` exists and is not disabled (checked per request)."""
        rec = self._records.get(USER_KIND, principal_id.removeprefix("user:"))
        return rec is not None and not rec.data["disabled"]

    # --- authentication ---------------------------------------------------------------------

    def login(self, tenant: str, name: str, password: str,
              totp_code: str | None = None) -> IssuedSession:
        """A new session for correct credentials; Unauthenticated otherwise."""
        rec, user = self._check_password(tenant, name, password)
        try:
            require_mfa = self._tenants.get(tenant).require_mfa
        except NotFound:
            raise _invalid() from None
        if user.totp_secret is not None:
            if not totp_code:
                raise Unauthenticated("TOTP code required", details={"mfa_required": True})
            step = totp.verify(user.totp_secret, totp_code, now=self._clock(),
                               last_step=user.totp_last_step)
            if step is None:
                self._fail(rec.key)
                raise Unauthenticated("invalid TOTP code", details={"mfa_required": True})
            # The conditional write is what makes a code single-use, even under races.
            self._succeed(rec, user, password, totp_last_step=step)
            mfa = True
        elif require_mfa:
            raise Unauthenticated("tenant requires TOTP: enroll before logging in",
                                  details={"mfa_enrollment_required": True})
        else:
            self._succeed(rec, user, password)
            mfa = False
        log.info("user %s/%s logged in (mfa=%s)", tenant, name, mfa)
        return self._sessions.start(user_principal_id(tenant, name), tenant, mfa=mfa)

    def begin_totp(self, tenant: str, name: str, password: str) -> tuple[str, str]:
        """Start TOTP enrollment: ``(secret, otpauth URI)`` for the authenticator app."""
        rec, user = self._check_password(tenant, name, password)
        if user.totp_secret is not None:
            raise Conflict("TOTP is already enabled (an admin can reset it)")
        secret = totp.new_secret()
        self._write(rec, user.model_copy(update={"totp_pending": secret}))
        return secret, totp.provisioning_uri(secret, f"{name}@{tenant}", self._issuer)

    def confirm_totp(self, tenant: str, name: str, password: str, code: str) -> None:
        """Finish enrollment with a first code from the app; TOTP is required from then on."""
        rec, user = self._check_password(tenant, name, password)
        if user.totp_pending is None:
            raise Conflict("no TOTP enrollment in progress")
        step = totp.verify(user.totp_pending, code, now=self._clock(), last_step=None)
        if step is None:
            self._fail(rec.key)
            raise Unauthenticated("invalid TOTP code")
        self._write(rec, user.model_copy(update={
            "totp_secret": user.totp_pending, "totp_pending": None, "totp_last_step": step,
            "failures": []}))
        log.info("user %s/%s enabled TOTP", tenant, name)

    # --- internals --------------------------------------------------------------------------

    def _check_password(self, tenant: str, name: str,
                        password: str) -> tuple[Record, _StoredUser]:
        key = _key(tenant, name)
        valid = bool(TENANT_NAME.fullmatch(tenant) and USER_NAME.fullmatch(name))
        rec = self._records.get(USER_KIND, key) if valid else None
        if rec is None:
            self._refuse("an unknown user", password)
        user = _StoredUser.model_validate(rec.data)
        if user.disabled:
            self._refuse(f"{key} (disabled)", password)
        if user.locked_until is not None and user.locked_until > self._clock():
            self._refuse(f"{key} (locked out)", password)
        if not self._passwords.verify(user.password_hash, password):
            self._fail(key)
            raise _invalid()
        return rec, user

    def _refuse(self, who: str, password: str) -> NoReturn:
        self._passwords.verify(None, password)  # the same cost as a real check
        log.info("login refused for %s", who)
        raise _invalid()

    def _fail(self, key: str) -> None:
        """Count a failure; lock the user at ``max_failures`` within the window."""
        policy = self._lockout
        for _ in range(_CAS_ATTEMPTS):
            rec = self._records.get(USER_KIND, key)
            if rec is None:
                return
            user = _StoredUser.model_validate(rec.data)
            now = self._clock()
            failures = [t for t in user.failures if t > now - policy.window] + [now]
            update: dict[str, object] = {"failures": failures}
            if len(failures) >= policy.max_failures:
                update = {"failures": [], "locked_until": now + policy.duration}
                log.warning("user %s locked out for %.0f s after %d failures", key,
                            policy.duration, len(failures))
            else:
                log.info("login failure %d/%d for %s", len(failures), policy.max_failures, key)
            try:
                self._write(rec, user.model_copy(update=update))
                return
            except RevisionMismatch:
                continue
        log.error("could not record a login failure for %s (contention)", key)

    def _succeed(self, rec: Record, user: _StoredUser, password: str,
                 totp_last_step: int | None = None) -> None:
        update: dict[str, object] = {}
        if self._passwords.needs_rehash(user.password_hash):
            update["password_hash"] = self._passwords.hash(password)
        if user.failures or user.locked_until is not None:
            update.update(failures=[], locked_until=None)
        if totp_last_step is not None:
            update["totp_last_step"] = totp_last_step
        if not update:
            return
        try:
            self._write(rec, user.model_copy(update=update))
        except RevisionMismatch:
            raise _invalid() from None  # a concurrent login used the same record (or code)

    def _write(self, rec: Record, user: _StoredUser) -> None:
        self._records.put(USER_KIND, rec.key, user.model_dump(), expected_revision=rec.revision)

    def _load(self, tenant: str, name: str) -> tuple[Record, _StoredUser]:
        rec = self._records.get(USER_KIND, _key(tenant, name))
        if rec is None:
            raise NotFound(f"no user {name[:64]!r} in tenant {tenant[:64]!r}")
        return rec, _StoredUser.model_validate(rec.data)

    def _update(self, tenant: str, name: str, change: Callable[[_StoredUser], _StoredUser]) -> None:
        for _ in range(_CAS_ATTEMPTS):
            rec, user = self._load(tenant, name)
            try:
                self._write(rec, change(user))
                return
            except RevisionMismatch:
                continue
        raise Conflict(f"user {tenant}/{name} is changing too often; try again")


def _key(tenant: str, name: str) -> str:
    return f"{tenant}/{name}"
