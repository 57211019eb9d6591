"""libvirt errors mapped into NovaCron's error tree, by libvirt error code (never message text).

:func:`translate` is the one place the libvirt driver turns a ``libvirt.libvirtError`` into a
:class:`~novacron.errors.NovaCronError`; the details carry libvirt's code and domain names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import libvirt

from novacron.errors import (
    AlreadyExists,
    DriverError,
    Forbidden,
    HostUnreachable,
    InvalidRequest,
    InvalidTransition,
    NoCapacity,
    NotFound,
    NotSupported,
    NovaCronError,
    OperationTimeout,
    Unauthenticated,
)

_BY_CODE: dict[int, type[NovaCronError]] = {
    # the object asked for does not exist
    libvirt.VIR_ERR_NO_DOMAIN: NotFound,
    libvirt.VIR_ERR_NO_STORAGE_POOL: NotFound,
    libvirt.VIR_ERR_NO_STORAGE_VOL: NotFound,
    libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT: NotFound,
    libvirt.VIR_ERR_NO_NETWORK: NotFound,
    libvirt.VIR_ERR_NO_DOMAIN_METADATA: NotFound,
    libvirt.VIR_ERR_NO_NODE_DEVICE: NotFound,
    libvirt.VIR_ERR_NO_SECRET: NotFound,
    libvirt.VIR_ERR_NO_INTERFACE: NotFound,
    # a name or key is taken
    libvirt.VIR_ERR_DOM_EXIST: AlreadyExists,
    libvirt.VIR_ERR_STORAGE_VOL_EXIST: AlreadyExists,
    libvirt.VIR_ERR_NETWORK_EXIST: AlreadyExists,
    # the object is in the wrong state for the operation (not running, already active, ...)
    libvirt.VIR_ERR_OPERATION_INVALID: InvalidTransition,
    # bad input
    libvirt.VIR_ERR_INVALID_ARG: InvalidRequest,
    libvirt.VIR_ERR_XML_ERROR: InvalidRequest,
    libvirt.VIR_ERR_XML_DETAIL: InvalidRequest,
    libvirt.VIR_ERR_XML_INVALID_SCHEMA: InvalidRequest,
    libvirt.VIR_ERR_INVALID_STORAGE_POOL: InvalidRequest,
    libvirt.VIR_ERR_INVALID_STORAGE_VOL: InvalidRequest,
    libvirt.VIR_ERR_MIGRATE_UNSAFE: InvalidRequest,
    # the hypervisor or this connection cannot do it
    libvirt.VIR_ERR_NO_SUPPORT: NotSupported,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED: NotSupported,
    libvirt.VIR_ERR_OPERATION_UNSUPPORTED: NotSupported,
    libvirt.VIR_ERR_CONFIG_UNSUPPORTED: NotSupported,
    # credentials
    libvirt.VIR_ERR_AUTH_FAILED: Unauthenticated,
    libvirt.VIR_ERR_AUTH_CANCELLED: Unauthenticated,
    libvirt.VIR_ERR_AUTH_UNAVAILABLE: Unauthenticated,
    libvirt.VIR_ERR_ACCESS_DENIED: Forbidden,
    libvirt.VIR_ERR_OPERATION_DENIED: Forbidden,
    # the daemon cannot be reached or the connection dropped
    libvirt.VIR_ERR_RPC: HostUnreachable,
    libvirt.VIR_ERR_INVALID_CONN: HostUnreachable,
    libvirt.VIR_ERR_NO_CONNECT: InvalidRequest,
    # out of time
    libvirt.VIR_ERR_OPERATION_TIMEOUT: OperationTimeout,
    libvirt.VIR_ERR_AGENT_UNRESPONSIVE: OperationTimeout,
}

# Error domains (where libvirt raised it) whose system errors mean the daemon is out of reach.
_UNREACHABLE_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE,
                                  libvirt.VIR_FROM_SSH})

_CODE_NAMES: dict[int, str] = {getattr(libvirt, n): n for n in dir(libvirt)
                               if n.startswith("VIR_ERR_") and n not in ("VIR_ERR_NONE",
                                                                         "VIR_ERR_WARNING",
                                                                         "VIR_ERR_ERROR")}
_DOMAIN_NAMES: dict[int, str] = {getattr(libvirt, n): n for n in dir(libvirt)
                                 if n.startswith("VIR_FROM_")}


def error_class(code: int, domain: int) -> type[NovaCronError]:
    """The NovaCron error class for a libvirt error code raised in error domain ``domain``."""
    if code == libvirt.VIR_ERR_SYSTEM_ERROR and domain in _UNREACHABLE_DOMAINS:
        return HostUnreachable
    return _BY_CODE.get(code, DriverError)


def map_error(err: libvirt.libvirtError, context: str, **details: Any) -> NovaCronError:
    """A NovaCron error for ``err``; ``context`` says what was being done."""
    code = err.get_error_code() or 0
    domain = err.get_error_domain() or 0
    cls = error_class(code, domain)
    message = err.get_error_message() or str(err)
    return cls(f"{context}: {message}", details={
        **details,
        "libvirt_code": _CODE_NAMES.get(code, str(code)),
        "libvirt_domain": _DOMAIN_NAMES.get(domain, str(domain)),
    })


def is_code(err: libvirt.libvirtError, *codes: int) -> bool:
    """Whether ``err`` carries one of the libvirt error ``codes``."""
    return err.get_error_code() in codes


@contextmanager
def translate(context: str, **details: Any) -> Iterator[None]:
    """Run the block, raising any libvirt error as its NovaCron error."""
    try:
        yield
    except libvirt.libvirtError as err:
        raise map_error(err, context, **details) from err


def pool_full(pool: str, needed_bytes: int, available_bytes: int) -> NoCapacity:
    """The error for a storage pool without room for a new volume."""
    return NoCapacity(
        f"storage pool {pool!r} has {available_bytes / 2**30:.1f} GiB free,"
        f" {needed_bytes / 2**30:.1f} GiB needed",
        details={"pool": pool, "needed_bytes": needed_bytes,
                 "available_bytes": available_bytes})
