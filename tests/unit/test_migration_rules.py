"""Migration rules without Ray: phase table, limits, timeouts, progress, refusals."""

from __future__ import annotations

import pytest

from novacron import migrations as rules
from novacron.errors import InvalidTransition, NotSupported
from novacron.ids import HostName, MigrationId, VMId
from novacron.model import VM, Migration, MigrationPolicy, MigrationProgress, VMSpec
from novacron.states import (
    MIGRATION_DONE,
    MIGRATION_TRANSITIONS,
    MigrationPhase,
    PowerState,
    check_migration_transition,
)

P = MigrationPhase


def mig(n: int, source: str = "h1", phase: P = P.PENDING) -> Migration:
    return Migration(id=MigrationId(f"mig-{n:03d}"), vm=VMId(f"vm-{n}"), source=HostName(source),
                     target=HostName("t"), mode="live", phase=phase)


def test_phase_table() -> None:
    assert set(MIGRATION_TRANSITIONS) == set(P)
    for done in MIGRATION_DONE:
        assert not MIGRATION_TRANSITIONS[done]
    check_migration_transition(P.PRECOPY, P.CANCELLING)
    with pytest.raises(InvalidTransition):
        check_migration_transition(P.SWITCHOVER, P.CANCELLING)  # past the point of no return
    with pytest.raises(InvalidTransition):
        check_migration_transition(P.COMPLETED, P.FAILED)


def test_limits_queue_beyond_two_per_source_and_five_per_cluster() -> None:
    running = [mig(i, phase=P.PRECOPY) for i in range(2)]
    assert not rules.can_admit(mig(9), running)
    assert rules.can_admit(mig(9, source="h2"), running)
    cluster = [mig(i, source=f"s{i}", phase=P.SYNCING_DISK) for i in range(5)]
    assert not rules.can_admit(mig(9, source="h9"), cluster)
    # older pending ones go first; finished ones do not count
    assert not rules.can_admit(mig(9), [mig(1, phase=P.PRECOPY), mig(2)])
    assert rules.can_admit(mig(2), [mig(1, phase=P.PRECOPY), mig(2), mig(9)])
    assert rules.can_admit(mig(9), [mig(i, phase=P.COMPLETED) for i in range(8)])


def test_timeouts_and_progress_never_go_back() -> None:
    vm = VM(id=VMId("vm-1"), name="a", desired=PowerState.RUNNING,
            spec=VMSpec(name="a", cpus=1, memory_mib=2048, disk_gib=2))
    assert rules.completion_timeout_s(vm) == 150 * 4
    small = vm.model_copy(update={"spec": VMSpec(name="a", cpus=1, memory_mib=64, disk_gib=0)})
    assert rules.completion_timeout_s(small) == 150
    old = MigrationProgress(percent=40.0)
    assert rules.advance(old, MigrationProgress(percent=30.0, bytes_sent=5)).percent == 40.0
    assert rules.advance(old, MigrationProgress(percent=130.0)).percent == 100.0


def test_refused_modes_and_options_say_why() -> None:
    rules.check_supported("live", MigrationPolicy(auto_converge=True), "sim", "sim")
    rules.check_supported("cold", MigrationPolicy(), "sim", "sim")
    rules.check_supported("warm", MigrationPolicy(), "sim", "sim")
    assert rules.path_for("sim", "sim", "live") == "sim"
    with pytest.raises(NotSupported, match="from a sim host to a nope host") as refused:
        rules.check_supported("live", MigrationPolicy(), "sim", "nope")
    assert refused.value.details == {"source_driver": "sim", "target_driver": "nope"}
    rules.check_supported("live", MigrationPolicy(compress=True, xbzrle=True), "sim", "sim")
    with pytest.raises(NotSupported, match=r"post_copy: a sim guest .* no page-fault path"):
        rules.check_supported("live", MigrationPolicy(post_copy=True, xbzrle=True), "sim", "sim")


def test_a_path_refuses_the_modes_it_cannot_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(rules.PATHS, ("sim", "cloud"), rules.Path("import", frozenset({"cold"})))
    assert rules.path_for("sim", "cloud", "cold") == "import"
    with pytest.raises(NotSupported, match=r"live migration .* not possible; use cold"):
        rules.path_for("sim", "cloud", "live")


def test_prediction_follows_the_cost_model() -> None:
    vm = VM(id=VMId("vm-1"), name="a", desired=PowerState.RUNNING,
            spec=VMSpec(name="a", cpus=1, memory_mib=1024, disk_gib=1))
    live = rules.prediction(vm, "live", MigrationPolicy(bandwidth_mib_s=100))
    cold = rules.prediction(vm, "cold", MigrationPolicy(bandwidth_mib_s=100))
    assert live.converges
    assert live.bytes >= 2 * 1024**3
    assert cold.downtime_s == pytest.approx(10.24)
    assert live.downtime_s < cold.downtime_s
