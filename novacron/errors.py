"""NovaCron's one exception tree.

Every failure NovaCron reports is one of these. Drivers map their SDK errors into this tree in one
place each (by error code, never by message text); the HTTP API maps the tree to status codes in
one place (``serve/errors.py``). Nothing returns status dicts or falls back silently.

::

    NovaCronError
    ├── InvalidRequest            bad input: a payload, a config, an argument
    ├── NotFound                  no such object (or not visible to the caller)
    ├── Conflict                  the request clashes with current state
    │   ├── AlreadyExists         a name or key is taken
    │   ├── RevisionMismatch      optimistic concurrency: the record changed meanwhile
    │   ├── InvalidTransition     a state machine forbids the move
    │   └── StaleEpoch            a fenced writer (older placement epoch) was refused
    ├── NoCapacity                no host can take the request (details say why)
    ├── QuotaExceeded             a tenant quota, or a provider's quota, would be exceeded
    ├── NotSupported              a driver lacks a capability (the message says which and why)
    ├── AuthError                 the caller's credentials, or a provider refused NovaCron's
    │   ├── Unauthenticated       no or bad credentials
    │   └── Forbidden             authenticated but not allowed
    ├── StoreError                the durable store cannot be used safely
    │   ├── StoreLocked           another process holds the store
    │   ├── StoreCorrupt          the file is not a valid NovaCron store
    │   └── SchemaTooNew          written by a newer NovaCron; never touched
    ├── DriverError               a hypervisor or cloud call failed
    │   ├── HostUnreachable       the host or its API cannot be reached
    │   ├── Throttled             the provider kept throttling after the SDK's retries
    │   └── GuestError            the guest did not do what was asked
    ├── Unavailable               the control plane is not running or not ready
    └── OperationTimeout          an operation did not finish in time
"""

from __future__ import annotations

from typing import Any


class NovaCronError(Exception):
    """Base of every NovaCron error: a stable machine-readable ``code``, a message, details."""

    code = "internal"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep details across pickling (Ray ships exceptions between processes).
        return (_rebuild, (type(self), self.message, self.details))

    def to_dict(self) -> dict[str, Any]:
        """The error as the API's ``{"code", "message", "details"}`` object."""
        return {"code": self.code, "message": self.message, "details": self.details}


def _rebuild(cls: type[NovaCronError], message: str, details: dict[str, Any]) -> NovaCronError:
    err = cls.__new__(cls)
    NovaCronError.__init__(err, message, details=details)
    return err


class InvalidRequest(NovaCronError):
    code = "invalid_request"


class NotFound(NovaCronError):
    code = "not_found"


class Conflict(NovaCronError):
    code = "conflict"


class AlreadyExists(Conflict):
    code = "already_exists"


class RevisionMismatch(Conflict):
    code = "revision_mismatch"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class StaleEpoch(Conflict):
    code = "stale_epoch"


class NoCapacity(NovaCronError):
    code = "no_capacity"


class QuotaExceeded(NovaCronError):
    """A quota would be exceeded.

    A tenant's quota in NovaCron: the API answers 403 (the caller may not have more). A cloud
    provider's quota on NovaCron's account for a host (a vCPU limit), raised by the cloud
    drivers with the ``provider`` in the details: the API answers 409, as for NoCapacity. The
    request is valid and the caller allowed; the account's current use clashes with it, and it
    can succeed once instances stop or the provider raises the quota. A 403 would tell the
    caller they lack a permission, and a 422 that their request is malformed.
    """

    code = "quota_exceeded"


class NotSupported(NovaCronError):
    code = "not_supported"


class AuthError(NovaCronError):
    """Credentials were missing, bad or not allowed.

    Raised for the API caller's own credentials (HTTP 401/403), and by the cloud drivers when a
    provider refused *NovaCron's* credentials for a host (or they could not be read). Those name
    the ``provider`` in their details and the API answers them with 422: the host's credential
    reference or its permissions must change; a 401/403 would tell the caller their own token
    failed.
    """

    code = "auth_error"


class Unauthenticated(AuthError):
    code = "unauthenticated"


class Forbidden(AuthError):
    code = "forbidden"


class StoreError(NovaCronError):
    code = "store_error"


class StoreLocked(StoreError):
    code = "store_locked"


class StoreCorrupt(StoreError):
    code = "store_corrupt"


class SchemaTooNew(StoreError):
    code = "schema_too_new"


class DriverError(NovaCronError):
    code = "driver_error"


class HostUnreachable(DriverError):
    code = "host_unreachable"


class Throttled(DriverError):
    """The provider kept throttling the calls after the SDK's own retries with backoff; the
    same request may succeed later (HTTP 503)."""

    code = "throttled"


class GuestError(DriverError):
    code = "guest_error"


class Unavailable(NovaCronError):
    code = "unavailable"


class OperationTimeout(NovaCronError):
    code = "timeout"
