"""Cold, warm and live migration of sim guests between hosts on two Ray nodes.

A ``ray.cluster_utils.Cluster`` of three nodes: a head and one node per sim host, each advertising
``novacron.host/<name>`` as ``cluster.yaml`` makes real hypervisor nodes do, so each host's
HostActor and VMActors live on its node. Memory and disk must be byte-identical after switchover,
and the guest must run on the target only, started there: a guest inherits ``RAY_RAYLET_PID`` from
the Ray worker that launched it, which names the node.

The Cluster needs a Ray instance of its own, so this module runs in a child process started by
``test_migration_multinode.py`` (it also runs alone: ``pytest tests/integration/
multinode_scenario.py``); it never touches the session's Ray.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from actors import names
from actors.runtime import stop_control_plane
from novacron.client import VMHandle
from novacron.migration.blocks import file_image_digest
from novacron.migration.pages import memory_digest
from novacron.model import Workload
from novacron.states import HostState, MigrationPhase
from tests.conftest import kill_guests_under
from tests.integration.conftest import Running, settings_for, start
from tests.integration.test_runtime import eventually

HOSTS = ("h1", "h2")
MIB = 1024**2


@dataclass
class MultiNode:
    """A running control plane on a Cluster whose nodes are the sim hosts."""

    running: Running
    raylets: dict[str, int]  # host -> pid of its node's raylet

    @property
    def state(self) -> Path:
        return self.running.settings.state_dir


@pytest.fixture(scope="module")
def multinode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiNode]:
    assert not ray.is_initialized()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 200 * MIB, "include_dashboard": False})
    nodes = {host: cluster.add_node(num_cpus=1, object_store_memory=200 * MIB,
                                    resources={names.host_resource(host): 1})
             for host in HOSTS}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="novacron-multinode",
             logging_level=logging.WARNING, log_to_driver=False)
    state = tmp_path_factory.mktemp("multinode") / "state"
    state.mkdir()
    settings = settings_for(state, f"nc-{uuid.uuid4().hex[:8]}")
    try:
        running = start(settings)
        eventually(lambda: {h.state for h in running.nc.hosts.list()} == {HostState.UP}, 60,
                   what="both hosts' agents beating on their nodes")
        raylets = {host: node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
                   for host, node in nodes.items()}
        yield MultiNode(running, raylets)
        stop_control_plane(settings.namespace, stop_guests=True)
    finally:
        kill_guests_under(state)
        ray.shutdown()
        cluster.shutdown()


def guests(env: MultiNode, vm_id: str) -> dict[str, int]:
    """Host -> the raylet pid in the environment of the live guest process of ``vm_id`` there
    (the node whose Ray worker launched it)."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if "novacron.drivers.simguest" not in cmd or proc.info["status"] == "zombie":
            continue
        guest_dir = Path(cmd[cmd.index("--dir") + 1])
        if guest_dir.name == vm_id and str(env.state) in str(guest_dir):
            found[guest_dir.parent.name] = int(proc.environ()["RAY_RAYLET_PID"])
    return found


def runs_on(env: MultiNode, vm_id: str, host: str) -> None:
    """The guest runs on ``host`` only, launched by a Ray worker of that host's node."""
    assert guests(env, vm_id) == {host: env.raylets[host]}


def make_vm(env: MultiNode, name: str, *, dirty: float = 0.0, disk_write: float = 0.0,
            memory_mib: int = 128, start: bool = True) -> VMHandle:
    vm = env.running.nc.vms.create(name, cpus=1, memory_mib=memory_mib, disk_gib=1, host="h1",
                                   start=start,
                                   workload=Workload(dirty_rate_mib_s=dirty,
                                                     disk_write_mib_s=disk_write))
    return vm.wait_for("running" if start else "stopped", timeout=60)


def fill_disk(env: MultiNode, host: str, vm_id: str, seed: int) -> str:
    """Write scattered random blocks into a stopped guest's disk; its digest."""
    disk = env.state / "sim" / host / vm_id / "disk.img"
    rng = np.random.default_rng(seed)
    with open(disk, "r+b") as f:
        for block in rng.choice(disk.stat().st_size // (64 * 1024), 64, replace=False):
            f.seek(int(block) * 64 * 1024)
            f.write(rng.bytes(64 * 1024))
    return file_image_digest(disk).hex()


def disk_digest(env: MultiNode, host: str, vm_id: str) -> str:
    return file_image_digest(env.state / "sim" / host / vm_id / "disk.img").hex()


def test_cold_then_warm_between_nodes(multinode: MultiNode) -> None:
    env, nc = multinode, multinode.running.nc
    vm = make_vm(env, "cw", start=False)
    written = fill_disk(env, "h1", vm.id, seed=1)
    mig = nc.migrations.start("cw", to="h2", mode="cold").wait(timeout=90)
    assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason
    assert vm.wait_for("stopped", timeout=30).record.host == "h2"
    assert disk_digest(env, "h2", vm.id) == written == mig.record.checkpoint["disk_digest"]
    assert not (env.state / "sim" / "h1" / vm.id).exists()  # the source is cleaned

    vm.start().wait_for("running", timeout=60)
    runs_on(env, vm.id, "h2")
    back = nc.migrations.start("cw", to="h1", mode="warm").wait(timeout=90)
    assert back.phase == MigrationPhase.COMPLETED, back.record.reason
    assert vm.wait_for("running", timeout=30).record.host == "h1"
    assert vm.record.epoch == 3
    runs_on(env, vm.id, "h1")
    # the guest writes nothing to its disk: what runs on h1 is what was on h2
    assert disk_digest(env, "h1", vm.id) == written == back.record.checkpoint["disk_digest"]
    assert back.record.outcome["disk_bytes_sent"] > 0
    assert not (env.state / "sim" / "h2" / vm.id).exists()


def test_live_with_compression_and_page_deltas_between_nodes(multinode: MultiNode) -> None:
    """A busy guest: pages dirtied meanwhile go again, as XBZRLE deltas; every target-side step
    runs on h2's node; the actor compares both memories while the source is paused."""
    env, nc = multinode, multinode.running.nc
    vm = make_vm(env, "busy", dirty=8.0, disk_write=0.5)
    runs_on(env, vm.id, "h1")
    mig = nc.migrations.start("busy", to="h2", mode="live",
                              policy={"compress": True, "xbzrle": True, "verify": True,
                                      "bandwidth_mib_s": 100, "max_downtime_ms": 100})
    percents = []
    while mig.refresh().phase not in (MigrationPhase.COMPLETED, MigrationPhase.FAILED,
                                      MigrationPhase.ROLLED_BACK):
        percents.append(mig.record.progress.percent)
        time.sleep(0.05)
    assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason
    assert percents == sorted(percents)
    out = mig.record.outcome
    assert out["memory_digest"]
    assert out["disk_digest"]
    assert out["memory_bytes_sent"] < 128 * MIB  # compressed; zero pages as indices
    assert mig.record.progress.bytes_sent == out["bytes"] >= out["memory_bytes_sent"]
    assert vm.wait_for("running", timeout=30).record.host == "h2"
    assert vm.record.epoch == 2
    runs_on(env, vm.id, "h2")


def test_live_memory_and_disk_byte_identical_between_nodes(multinode: MultiNode) -> None:
    """A guest that writes nothing once booted: what runs on h2 is exactly what h1 held."""
    env, nc = multinode, multinode.running.nc
    vm = make_vm(env, "still", start=False)
    written = fill_disk(env, "h1", vm.id, seed=2)
    vm.start().wait_for("running", timeout=60)
    source_memory = memory_digest(env.state / "shm" / "h1" / f"{vm.id}.mem")
    mig = nc.migrations.start("still", to="h2", mode="live",
                              policy={"verify": True}).wait(timeout=90)
    assert mig.phase == MigrationPhase.COMPLETED, mig.record.reason
    vm.wait_for("running", timeout=30)
    runs_on(env, vm.id, "h2")
    out = mig.record.outcome
    assert out["zero_pages"] == 0  # the first pass sends the pages ever written, none zero
    assert out["memory_bytes_sent"] < 0.2 * 128 * MIB  # its working set, not all its RAM
    assert memory_digest(env.state / "shm" / "h2" / f"{vm.id}.mem") == source_memory
    assert out["memory_digest"] == source_memory
    assert disk_digest(env, "h2", vm.id) == written == out["disk_digest"]
    assert not (env.state / "shm" / "h1" / f"{vm.id}.mem").exists()
    assert os.path.exists(env.state / "sim" / "h2" / vm.id / "disk.img")


def test_a_killed_run_starts_over_and_a_cancel_cleans_the_far_node(multinode: MultiNode) -> None:
    """The MigrationActor dies in pre-copy (its end on h2 with it): the restarted run sets up a
    new one; a cancel then rolls back: the same guest runs on h1, h2 keeps nothing of it."""
    env, nc = multinode, multinode.running.nc
    vm = make_vm(env, "phoenix", dirty=40.0)
    guest = vm.record.guest_id
    mig = nc.migrations.start("phoenix", to="h2", mode="live",
                              policy={"bandwidth_mib_s": 20, "max_downtime_ms": 1})
    eventually(lambda: mig.refresh().phase == MigrationPhase.PRECOPY, 60, what="pre-copy")
    actor = env.running.actor(f"mig:{mig.id}")
    pid = ray.get(actor.pid.remote())
    ray.kill(actor, no_restart=False)
    eventually(lambda: ray.get(actor.pid.remote()) != pid, 60, what="a restarted run")
    sent = mig.refresh().record.progress.bytes_sent
    eventually(lambda: mig.refresh().record.progress.bytes_sent > sent, 60,
               what="pages flowing again")
    mig.cancel().wait(timeout=60)
    assert mig.phase == MigrationPhase.ROLLED_BACK, mig.record.reason
    assert vm.wait_for("running", timeout=30).record.host == "h1"
    assert vm.record.guest_id == guest
    runs_on(env, vm.id, "h1")
    assert not (env.state / "sim" / "h2" / vm.id).exists()
    assert not (env.state / "shm" / "h2" / f"{vm.id}.mem").exists()
