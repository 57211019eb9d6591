"""Login sessions ``ncs_<id>_<secret>``: random, stored as a hash, expiring, revocable."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import SecretStr

from novacron.auth import credentials
from novacron.auth.records import AuthRecords, Clock, wall_clock
from novacron.errors import InvalidRequest, NotFound, Unauthenticated

log = logging.getLogger("novacron.auth")

SESSION_KIND = "auth.session"
PREFIX = "ncs"
DEFAULT_TTL = 12 * 3600.0


@dataclass(frozen=True, slots=True)
class Session:
    """A login session of a local user (no secret; safe to list and log)."""

    id: str
    user: str  # the user's principal id
    tenant: str
    created_at: float
    expires_at: float
    mfa: bool
    revoked_at: float | None = None


@dataclass(frozen=True, slots=True)
class IssuedSession:
    """A new session: ``token`` goes to the client (cookie or bearer) once, never stored."""

    token: SecretStr
    session: Session


class SessionService:
    """Starts, validates, lists and revokes sessions."""

    def __init__(self, records: AuthRecords, *, clock: Clock = wall_clock,
                 ttl: float = DEFAULT_TTL) -> None:
        if ttl <= 0:
            raise InvalidRequest("session lifetime must be positive")
        self._records = records
        self._clock = clock
        self._ttl = ttl

    def start(self, user: str, tenant: str, *, mfa: bool) -> IssuedSession:
        cred_id, digest, raw = credentials.mint(PREFIX)
        now = self._clock()
        session = Session(cred_id, user, tenant, now, now + self._ttl, mfa)
        self._records.create(SESSION_KIND, cred_id, {**asdict(session), "digest": digest})
        log.info("started session %s for %s", cred_id, user)
        return IssuedSession(raw, session)

    def validate(self, raw: str) -> Session:
        """The live session of a presented value; Unauthenticated otherwise."""
        cred_id, secret = credentials.parse(PREFIX, raw, "session")
        rec = self._records.get(SESSION_KIND, cred_id)
        if rec is None or not credentials.matches(rec.data["digest"], cred_id, secret):
            raise Unauthenticated("invalid session")
        session = _session(rec.data)
        if session.revoked_at is not None:
            raise Unauthenticated("session ended")
        if self._clock() >= session.expires_at:
            raise Unauthenticated("session expired")
        return session

    def revoke(self, session_id: str) -> None:
        """End a session (idempotent)."""
        rec = self._records.get(SESSION_KIND, session_id)
        if rec is None:
            raise NotFound("no such session")
        if rec.data.get("revoked_at") is None:
            self._records.put(SESSION_KIND, session_id, {**rec.data, "revoked_at": self._clock()})
            log.info("revoked session %s", session_id)

    def revoke_user(self, user: str) -> int:
        """End every live session of ``user`` (password change, disable); how many ended."""
        live = [s for s in self.list(user) if s.revoked_at is None]
        for s in live:
            self.revoke(s.id)
        return len(live)

    def list(self, user: str | None = None) -> list[Session]:
        where = None if user is None else {"user": user}
        return [_session(r.data) for r in self._records.all(SESSION_KIND, where=where)]


def _session(data: dict[str, Any]) -> Session:
    return Session(id=data["id"], user=data["user"], tenant=data["tenant"],
                   created_at=data["created_at"], expires_at=data["expires_at"],
                   mfa=data["mfa"], revoked_at=data.get("revoked_at"))
