"""Drains and rebalancing on the session's Ray with sim guests: a drained host empties while its
VMs keep running on the other hosts (their guest processes alive there), takes no new VM
meanwhile, survives a controller restart, and can be cancelled; the CLI drives both."""

from __future__ import annotations

import json
import time
from typing import Any

import psutil
import pytest
import ray

from novacron import cli
from novacron.errors import NoCapacity
from novacron.model import HostCreate
from novacron.states import DrainState, HostState, MigrationPhase, VMState
from tests.conftest import sim_host_config
from tests.integration.conftest import Running
from tests.integration.test_migration import guest_hosts, make_vm
from tests.integration.test_runtime import eventually


def add_host(running: Running, name: str, memory_mib: int = 4096) -> None:
    running.nc.call("register_host", HostCreate(name=name, driver="sim", config=sim_host_config(
        running.settings.state_dir, cpus=4, memory_mib=memory_mib)))


def cli_args(running: Running, *args: str) -> list[str]:
    return [*args, "--namespace", running.settings.namespace,
            "--state-dir", str(running.settings.state_dir)]


def printed_json(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """The JSON document the CLI printed (Ray's own lines may come before it)."""
    out = capsys.readouterr().out
    doc: dict[str, Any] = json.loads(out[out.index("\n{") + 1 if not out.startswith("{")
                                         else 0:])
    return doc


def alive(pid: int) -> bool:
    return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_drain_empties_the_host_and_the_vms_run_on_elsewhere(
        running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    nc, state = running.nc, running.settings.state_dir
    add_host(running, "h3")
    vms = [make_vm(running, f"d{i}", host="h1", memory_mib=64 + 32 * i, dirty=1.0)
           for i in range(3)]
    host = nc.hosts.drain("h1")
    assert host.state == HostState.DRAINING
    assert host.drain is not None
    assert host.drain.state == DrainState.RUNNING
    again = nc.hosts.drain("h1")  # idempotent
    assert again.drain is not None
    assert again.drain.started_at == host.drain.started_at
    # the host takes no new VM meanwhile
    during = nc.vms.create("during", cpus=1, memory_mib=64)
    assert during.host in ("h2", "h3")
    with pytest.raises(NoCapacity, match="1 draining"):
        nc.vms.create("pinned", cpus=1, memory_mib=64, host="h1")
    # the drain lives in the store: a restarted controller carries it on
    ray.kill(running.controller, no_restart=False)
    # the CLI follows it to its end (and starting it again is harmless)
    code = cli.main(cli_args(running, "host", "drain", "h1", "--wait", "--json",
                             "--timeout", "180"))
    printed = printed_json(capsys)
    assert code == 0, printed
    assert printed["state"] == "maintenance"
    assert printed["drain"]["state"] == "completed"
    assert sorted(printed["drain"]["moved"]) == sorted(vm.id for vm in vms)
    for vm in vms:
        record = vm.wait_for("running", timeout=30).record
        assert record.host in ("h2", "h3")
        assert record.epoch >= 2
        assert guest_hosts(state, vm.id) == {record.host}  # its guest runs there, only there
        assert alive(int(record.guest_id or 0))
    assert nc.vms.list(host="h1") == []
    assert guest_hosts(state, during.id) == {during.wait_for("running", timeout=30).host}
    migrations = [m for m in nc.migrations.list() if m.record.source == "h1"]
    assert {m.record.mode for m in migrations} == {"live"}
    assert all(m.phase == MigrationPhase.COMPLETED for m in migrations)
    # back in service by hand; it takes VMs again
    assert nc.hosts.activate("h1").state == HostState.UP
    assert nc.vms.create("after", cpus=1, memory_mib=64, host="h1").host == "h1"


def test_cancelling_a_drain_stops_it_and_reopens_the_host(
        running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    nc, state = running.nc, running.settings.state_dir
    vms = [make_vm(running, f"c{i}", host="h1", memory_mib=64) for i in range(4)]
    host = nc.hosts.drain("h1")
    assert host.drain is not None
    assert len(host.drain.migrating) == 2  # at most two at once out of one host; two wait
    assert cli.main(cli_args(running, "host", "drain", "h1", "--cancel", "--json")) == 0
    printed = printed_json(capsys)
    assert printed["state"] == "up"
    assert printed["drain"]["state"] == "cancelled"
    started = [m for m in nc.migrations.list() if m.record.source == "h1"]
    assert 2 <= len(started) < len(vms)
    for mig in started:  # each rolls back, or had passed its switchover before the cancel
        mig.wait(timeout=60)
        assert mig.phase in (MigrationPhase.ROLLED_BACK, MigrationPhase.COMPLETED)
        assert mig.phase == MigrationPhase.COMPLETED or mig.record.cancel_requested
    eventually(lambda: all(vm.refresh().state == VMState.RUNNING for vm in vms), 30,
               what="every VM running")
    time.sleep(1.0)  # a few reconcile passes: no migration starts any more
    assert len([m for m in nc.migrations.list() if m.record.source == "h1"]) == len(started)
    never = {vm.id for vm in vms} - {m.record.vm for m in started}
    assert never
    for vm in vms:
        assert vm.host == "h1" or vm.id not in never
        assert guest_hosts(state, vm.id) == {vm.host}  # running where its record says
    h1 = nc.hosts.get("h1")
    assert h1.state == HostState.UP
    assert h1.drain is not None
    assert h1.drain.state == DrainState.CANCELLED
    assert nc.vms.create("welcome", cpus=1, memory_mib=64, host="h1").host == "h1"


def test_rebalance_moves_vms_off_a_hot_host(running: Running,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    nc, state = running.nc, running.settings.state_dir
    add_host(running, "tiny", memory_mib=512)
    vms = [make_vm(running, f"r{i}", host="tiny", memory_mib=128) for i in range(4)]
    assert cli.main(cli_args(running, "rebalance", "--json")) == 0  # a proposal: nothing moves
    proposal = printed_json(capsys)
    assert proposal["before"]["hot"] == ["tiny"]
    assert len(proposal["items"]) == 2  # two migrations at once out of one host
    assert all(i["source"] == "tiny" and i["mode"] == "live" for i in proposal["items"])
    assert nc.migrations.list() == []
    applied = nc.rebalance(apply=True)
    assert [i["vm"] for i in applied["items"]] == [i["vm"] for i in proposal["items"]]
    for item in applied["items"]:
        mig = nc.migrations.get(item["migration"]).wait(timeout=60)
        assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason
    for vm in vms:
        record = vm.wait_for("running", timeout=30).record
        assert guest_hosts(state, vm.id) == {record.host}
    assert sum(vm.host == "tiny" for vm in vms) == 2
    assert nc.rebalance()["before"]["hot"] == []
