"""The VM and host state machines."""

from __future__ import annotations

import pytest

from novacron.errors import InvalidRequest, InvalidTransition
from novacron.states import (
    HOST_TRANSITIONS,
    VM_TRANSITIONS,
    HostState,
    PowerState,
    VMState,
    check_host_transition,
    check_vm_action,
    check_vm_transition,
)


def test_every_state_has_a_row() -> None:
    assert set(VM_TRANSITIONS) == set(VMState)
    assert set(HOST_TRANSITIONS) == set(HostState)


def test_deleted_is_final() -> None:
    for state in VMState:
        if state != VMState.DELETED:
            with pytest.raises(InvalidTransition, match="cannot go from deleted"):
                check_vm_transition(VMState.DELETED, state)


@pytest.mark.parametrize(("current", "new", "ok"), [
    (VMState.PENDING, VMState.STARTING, True),
    (VMState.RUNNING, VMState.PAUSED, True),
    (VMState.STOPPED, VMState.PAUSED, False),
    (VMState.DELETING, VMState.RUNNING, False),
    (VMState.UNKNOWN, VMState.RUNNING, True),
    (VMState.RUNNING, VMState.RUNNING, True),
])
def test_vm_transitions(current: VMState, new: VMState, ok: bool) -> None:
    if ok:
        check_vm_transition(current, new)
    else:
        with pytest.raises(InvalidTransition) as info:
            check_vm_transition(current, new)
        assert info.value.details == {"from": current.value, "to": new.value}


@pytest.mark.parametrize(("action", "state", "result"), [
    ("start", VMState.STOPPED, PowerState.RUNNING),
    ("stop", VMState.RUNNING, PowerState.STOPPED),
    ("pause", VMState.RUNNING, PowerState.PAUSED),
    ("resume", VMState.PAUSED, PowerState.RUNNING),
    ("reboot", VMState.RUNNING, PowerState.RUNNING),
    ("pause", VMState.STOPPED, None),
    ("resume", VMState.RUNNING, None),
    ("start", VMState.RUNNING, None),
    ("reboot", VMState.PAUSED, None),
])
def test_vm_actions(action: str, state: VMState, result: PowerState | None) -> None:
    if result is not None:
        assert check_vm_action(action, state) == result
    else:
        with pytest.raises(InvalidTransition, match=f"cannot {action} a VM that is"):
            check_vm_action(action, state)


def test_unknown_action() -> None:
    with pytest.raises(InvalidRequest, match="unknown VM action"):
        check_vm_action("explode", VMState.RUNNING)


def test_host_transitions() -> None:
    check_host_transition(HostState.UP, HostState.MAINTENANCE)
    check_host_transition(HostState.UNREACHABLE, HostState.UP)
    with pytest.raises(InvalidTransition):
        check_host_transition(HostState.MAINTENANCE, HostState.DRAINING)
