"""State machines of VMs, hosts, drains and migrations: one enum and one allowed-transition table
each.

Kept free of third-party imports so the lean actors (VMActor) can use them without pulling in
pydantic. ``check_vm_transition`` and ``check_host_transition`` raise
:class:`~novacron.errors.InvalidTransition` for a move the table forbids.
"""

from __future__ import annotations

from enum import StrEnum

from novacron.errors import InvalidRequest, InvalidTransition


class VMState(StrEnum):
    """Observed state of a VM."""

    PENDING = "pending"  # accepted, not yet defined on its host
    STOPPED = "stopped"  # defined on its host, not running
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    MIGRATING = "migrating"
    ERROR = "error"
    UNKNOWN = "unknown"  # its host cannot be reached, or the driver reported an unmapped state
    DELETING = "deleting"
    DELETED = "deleted"


class PowerState(StrEnum):
    """What a user asked a VM to be (the desired state)."""

    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"
    DELETED = "deleted"


class HostState(StrEnum):
    """State of a host."""

    UP = "up"
    DRAINING = "draining"  # takes no new VMs; its VMs are being moved away
    MAINTENANCE = "maintenance"  # takes no new VMs; empty or its VMs stay put
    UNREACHABLE = "unreachable"  # missed its heartbeats


_V = VMState
VM_TRANSITIONS: dict[VMState, frozenset[VMState]] = {
    _V.PENDING: frozenset({_V.STOPPED, _V.STARTING, _V.RUNNING, _V.ERROR, _V.DELETING}),
    _V.STOPPED: frozenset({_V.PENDING, _V.STARTING, _V.RUNNING, _V.MIGRATING, _V.ERROR, _V.UNKNOWN,
                           _V.DELETING}),
    _V.STARTING: frozenset({_V.PENDING, _V.RUNNING, _V.STOPPED, _V.PAUSED, _V.ERROR, _V.UNKNOWN,
                            _V.STOPPING, _V.DELETING}),
    _V.RUNNING: frozenset({_V.PENDING, _V.STOPPING, _V.STOPPED, _V.PAUSED, _V.STARTING,
                           _V.MIGRATING, _V.ERROR, _V.UNKNOWN, _V.DELETING}),
    _V.PAUSED: frozenset({_V.PENDING, _V.RUNNING, _V.STOPPING, _V.STOPPED, _V.MIGRATING, _V.ERROR,
                          _V.UNKNOWN, _V.DELETING}),
    _V.STOPPING: frozenset({_V.PENDING, _V.STOPPED, _V.RUNNING, _V.ERROR, _V.UNKNOWN, _V.DELETING}),
    _V.MIGRATING: frozenset({_V.RUNNING, _V.STOPPED, _V.PAUSED, _V.ERROR, _V.UNKNOWN}),
    _V.ERROR: frozenset({_V.PENDING, _V.STOPPED, _V.STARTING, _V.RUNNING, _V.PAUSED, _V.UNKNOWN,
                         _V.DELETING}),
    _V.UNKNOWN: frozenset({_V.PENDING, _V.STOPPED, _V.STARTING, _V.RUNNING, _V.PAUSED,
                           _V.STOPPING, _V.MIGRATING, _V.ERROR, _V.DELETING}),
    _V.DELETING: frozenset({_V.DELETED, _V.ERROR, _V.UNKNOWN}),
    _V.DELETED: frozenset(),
}

_H = HostState
HOST_TRANSITIONS: dict[HostState, frozenset[HostState]] = {
    _H.UP: frozenset({_H.DRAINING, _H.MAINTENANCE, _H.UNREACHABLE}),
    _H.DRAINING: frozenset({_H.UP, _H.MAINTENANCE, _H.UNREACHABLE}),
    _H.MAINTENANCE: frozenset({_H.UP, _H.UNREACHABLE}),
    _H.UNREACHABLE: frozenset({_H.UP, _H.DRAINING, _H.MAINTENANCE}),
}

class DrainState(StrEnum):
    """State of a host's drain (its evacuation through migrations, ``novacron.evacuation``)."""

    RUNNING = "running"  # VMs are being moved away, or wait for their turn
    BLOCKED = "blocked"  # nothing moves: the VMs left cannot go anywhere now (retried each pass)
    COMPLETED = "completed"  # the host is empty and in maintenance
    CANCELLED = "cancelled"  # stopped on request; the host is up again


_D = DrainState
DRAIN_TRANSITIONS: dict[DrainState, frozenset[DrainState]] = {
    _D.RUNNING: frozenset({_D.BLOCKED, _D.COMPLETED, _D.CANCELLED}),
    _D.BLOCKED: frozenset({_D.RUNNING, _D.COMPLETED, _D.CANCELLED}),
    _D.COMPLETED: frozenset(),
    _D.CANCELLED: frozenset(),
}
DRAIN_ACTIVE = frozenset({_D.RUNNING, _D.BLOCKED})


def check_drain_transition(current: DrainState, new: DrainState) -> None:
    """Raise InvalidTransition unless a drain may move from ``current`` to ``new``."""
    if new != current and new not in DRAIN_TRANSITIONS[current]:
        raise InvalidTransition(
            f"a drain cannot go from {current.value} to {new.value}",
            details={"from": current.value, "to": new.value},
        )


# User actions on a VM: the states each is allowed from, and the power state it asks for.
VM_ACTIONS: dict[str, tuple[frozenset[VMState], PowerState]] = {
    "start": (frozenset({_V.STOPPED, _V.ERROR}), PowerState.RUNNING),
    "stop": (frozenset({_V.RUNNING, _V.PAUSED, _V.STARTING, _V.ERROR, _V.UNKNOWN}),
             PowerState.STOPPED),
    "reboot": (frozenset({_V.RUNNING}), PowerState.RUNNING),
    "pause": (frozenset({_V.RUNNING}), PowerState.PAUSED),
    "resume": (frozenset({_V.PAUSED}), PowerState.RUNNING),
}

# The observed state each power state settles in.
SETTLED: dict[PowerState, VMState] = {
    PowerState.RUNNING: VMState.RUNNING,
    PowerState.STOPPED: VMState.STOPPED,
    PowerState.PAUSED: VMState.PAUSED,
    PowerState.DELETED: VMState.DELETED,
}


def check_vm_transition(current: VMState, new: VMState) -> None:
    """Raise InvalidTransition unless a VM may move from ``current`` to ``new``."""
    if new != current and new not in VM_TRANSITIONS[current]:
        raise InvalidTransition(
            f"a VM cannot go from {current.value} to {new.value}",
            details={"from": current.value, "to": new.value},
        )


def check_host_transition(current: HostState, new: HostState) -> None:
    """Raise InvalidTransition unless a host may move from ``current`` to ``new``."""
    if new != current and new not in HOST_TRANSITIONS[current]:
        raise InvalidTransition(
            f"a host cannot go from {current.value} to {new.value}",
            details={"from": current.value, "to": new.value},
        )


def check_vm_action(action: str, current: VMState) -> PowerState:
    """The power state ``action`` asks for, or InvalidTransition/InvalidRequest if not allowed."""
    if action not in VM_ACTIONS:
        raise InvalidRequest(
            f"unknown VM action {action!r}; expected one of {', '.join(sorted(VM_ACTIONS))}",
            details={"action": action},
        )
    allowed, target = VM_ACTIONS[action]
    if current not in allowed:
        raise InvalidTransition(
            f"cannot {action} a VM that is {current.value}"
            f" (allowed from: {', '.join(sorted(s.value for s in allowed))})",
            details={"action": action, "state": current.value},
        )
    return target


class MigrationPhase(StrEnum):
    """Phase of a migration. A cold one goes preparing, syncing-disk, switchover; a warm one
    stops the guest only in stop-and-copy; a live one pre-copies its memory before that."""

    PENDING = "pending"  # accepted; queued while the cluster or its source is at its limit
    PREPARING = "preparing"  # target capacity reserved, guest defined on the target
    SYNCING_DISK = "syncing-disk"
    PRECOPY = "precopy"  # memory copied while the guest runs, pass after pass
    STOP_AND_COPY = "stop-and-copy"  # the guest is paused; the last dirty pages and disk move
    SWITCHOVER = "switchover"  # the target guest starts; the record moves to it
    COMPLETED = "completed"
    CANCELLING = "cancelling"  # rolling back: the target is cleaned, the source keeps the VM
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"


_M = MigrationPhase
_ROLLBACK = frozenset({_M.CANCELLING, _M.FAILED})
MIGRATION_TRANSITIONS: dict[MigrationPhase, frozenset[MigrationPhase]] = {
    _M.PENDING: frozenset({_M.PREPARING}) | _ROLLBACK,
    _M.PREPARING: frozenset({_M.SYNCING_DISK}) | _ROLLBACK,
    _M.SYNCING_DISK: frozenset({_M.PRECOPY, _M.STOP_AND_COPY, _M.SWITCHOVER}) | _ROLLBACK,
    _M.PRECOPY: frozenset({_M.STOP_AND_COPY}) | _ROLLBACK,
    _M.STOP_AND_COPY: frozenset({_M.SWITCHOVER}) | _ROLLBACK,
    _M.SWITCHOVER: frozenset({_M.COMPLETED, _M.FAILED}),  # past the point of no return
    _M.CANCELLING: frozenset({_M.ROLLED_BACK, _M.FAILED}),
    _M.COMPLETED: frozenset(),
    _M.ROLLED_BACK: frozenset(),
    _M.FAILED: frozenset(),
}
MIGRATION_DONE = frozenset({_M.COMPLETED, _M.ROLLED_BACK, _M.FAILED})


def check_migration_transition(current: MigrationPhase, new: MigrationPhase) -> None:
    """Raise InvalidTransition unless a migration may move from ``current`` to ``new``."""
    if new != current and new not in MIGRATION_TRANSITIONS[current]:
        raise InvalidTransition(
            f"a migration cannot go from {current.value} to {new.value}",
            details={"from": current.value, "to": new.value},
        )
