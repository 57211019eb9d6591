"""Tenants: the owner of every record, with a quota and whether its users need TOTP."""

from __future__ import annotations

import logging
import time

from pydantic import BaseModel, ConfigDict, Field

from novacron.auth.principals import check_tenant_name
from novacron.auth.quotas import Quota
from novacron.auth.records import AuthRecords, Clock, wall_clock
from novacron.errors import AlreadyExists, NotFound

log = logging.getLogger("novacron.auth")

TENANT_KIND = "auth.tenant"
DEFAULT_TENANT = "default"


class Tenant(BaseModel):
    """A tenant record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    quota: Quota = Field(default_factory=Quota)
    require_mfa: bool = False
    description: str = Field(default="", max_length=1024)
    created_at: float = Field(default_factory=time.time)


class TenantStore:
    """Tenants in :class:`AuthRecords`."""

    def __init__(self, records: AuthRecords, *, clock: Clock = wall_clock) -> None:
        self._records = records
        self._clock = clock

    def create(self, name: str, *, quota: Quota | None = None, require_mfa: bool = False,
               description: str = "") -> Tenant:
        tenant = Tenant(name=check_tenant_name(name), quota=quota or Quota(),
                        require_mfa=require_mfa, description=description,
                        created_at=self._clock())
        try:
            self._records.create(TENANT_KIND, name, tenant.model_dump())
        except AlreadyExists:
            raise AlreadyExists(f"tenant {name!r} already exists") from None
        log.info("created tenant %s", name)
        return tenant

    def ensure(self, name: str = DEFAULT_TENANT) -> Tenant:
        """The tenant ``name``, created (unlimited) if missing: for first start."""
        try:
            return self.create(name)
        except AlreadyExists:
            return self.get(name)

    def get(self, name: str) -> Tenant:
        rec = self._records.get(TENANT_KIND, name)
        if rec is None:
            raise NotFound(f"no tenant {name[:64]!r}")
        return Tenant.model_validate(rec.data)

    def list(self) -> list[Tenant]:
        return [Tenant.model_validate(r.data) for r in self._records.all(TENANT_KIND)]

    def update(self, name: str, *, quota: Quota | None = None,
               require_mfa: bool | None = None) -> Tenant:
        """Change a tenant's quota and/or MFA requirement (optimistic, no lost update)."""
        rec = self._records.get(TENANT_KIND, name)
        if rec is None:
            raise NotFound(f"no tenant {name[:64]!r}")
        changes: dict[str, object] = {}
        if quota is not None:
            changes["quota"] = quota
        if require_mfa is not None:
            changes["require_mfa"] = require_mfa
        tenant = Tenant.model_validate(rec.data).model_copy(update=changes)
        self._records.put(TENANT_KIND, name, tenant.model_dump(),
                          expected_revision=rec.revision)
        log.info("updated tenant %s: %s", name, ", ".join(sorted(changes)) or "nothing")
        return tenant

    def delete(self, name: str) -> None:
        """Delete a tenant record; the caller first removes its objects and role bindings."""
        try:
            self._records.delete(TENANT_KIND, name)
        except NotFound:
            raise NotFound(f"no tenant {name[:64]!r}") from None
        log.info("deleted tenant %s", name)
