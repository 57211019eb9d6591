"""HostAgent: heartbeats, and guest events passed on the moment an event-pushing driver sends them
(libvirt's in-process test hypervisor, ``test:///default``); polled-only drivers refuse events."""

from __future__ import annotations

import contextlib
import queue
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("libvirt", reason="libvirt-python is not installed (pip install "
                    "'novacron[libvirt]'; needs the libvirt-dev and pkg-config packages)")

import libvirt

from novacron.agents import HostAgent
from novacron.drivers.base import GuestConfig
from novacron.drivers.libvirt import LibvirtDriver, domain_name
from novacron.drivers.libvirt_xml import Domain
from novacron.errors import NotFound, NotSupported
from tests.unit.test_sim_driver import make_driver as make_sim_driver

Beat = tuple[str, dict[str, Any], list[dict[str, Any]]]


class Recorder:
    """A Reporter that queues every heartbeat."""

    def __init__(self) -> None:
        self.beats: queue.Queue[Beat] = queue.Queue()

    def report_vm(self, vm_id: str, epoch: int, observed: Mapping[str, Any]) -> None:
        raise AssertionError("a HostAgent reports through heartbeats only")

    def heartbeat(self, host: str, stats: Mapping[str, Any],
                  guests: Sequence[Mapping[str, Any]]) -> None:
        self.beats.put((host, dict(stats), [dict(g) for g in guests]))

    def next_guest(self, vm_id: str, timeout_s: float = 5.0) -> tuple[dict[str, Any],
                                                                      dict[str, Any]]:
        """The next heartbeat entry of ``vm_id`` and the stats sent with it."""
        while True:
            _host, stats, guests = self.beats.get(timeout=timeout_s)
            for guest in guests:
                if guest["vm_id"] == vm_id:
                    return guest, stats


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[LibvirtDriver]:
    drv = LibvirtDriver("agent-host", "test:///default", {"pool_path": "/novacron"}, tmp_path)
    drv.connect()
    yield drv
    drv.close()


@pytest.fixture
def vm(driver: LibvirtDriver) -> Iterator[str]:
    vm_id = f"vm-agent-{uuid.uuid4().hex[:10]}"
    yield vm_id
    with contextlib.suppress(NotFound):
        driver.stop(vm_id, force=True)
    driver.undefine(vm_id)


def config(vm_id: str) -> GuestConfig:
    return GuestConfig(vm_id=vm_id, name="agent", cpus=1, memory_mib=64, disk_gib=1, epoch=3)


def test_events_are_sent_as_they_happen(driver: LibvirtDriver, vm: str) -> None:
    reporter = Recorder()
    agent = HostAgent("agent-host", driver, reporter)
    assert agent.watch() is True
    assert agent.watch() is True  # idempotent: still one subscription
    sample = agent.sample()

    driver.define(config(vm))
    defined, stats = reporter.next_guest(vm)
    assert defined["state"] == "stopped"
    assert stats == sample  # events carry the last periodic sample, not a new one
    started = driver.start(vm, epoch=3)
    running, _ = reporter.next_guest(vm)
    assert {k: running[k] for k in ("state", "guest_id", "epoch")} == {
        "state": "running", "guest_id": started.guest_id, "epoch": 3}
    assert running["time"] >= defined["time"]
    driver.stop(vm, force=True)
    assert reporter.next_guest(vm)[0]["state"] == "stopped"
    assert reporter.beats.empty()  # exactly one heartbeat per event

    # Another client keeps test:///default's state alive (it goes with the last connection).
    other = LibvirtDriver("other", "test:///default", {"pool_path": "/novacron"},
                          driver.state_dir)
    other.connect()
    agent.close()  # unsubscribed and disconnected: the other client's change is not sent
    other.start(vm, epoch=3)
    with pytest.raises(queue.Empty):
        reporter.next_guest(vm, timeout_s=1.0)
    other.stop(vm, force=True)
    other.close()


def test_a_domain_with_a_novacron_name_but_not_novacrons_is_not_sent(
        driver: LibvirtDriver, vm: str) -> None:
    reporter = Recorder()
    HostAgent("agent-host", driver, reporter).watch()
    conn = libvirt.open("test:///default")  # shares the driver's hypervisor state
    foreign = Domain(name=domain_name(vm), uuid=str(uuid.uuid4()), memory_mib=64, vcpus=1,
                     domain_type="test")
    conn.defineXML(foreign.to_xml())
    try:
        conn.lookupByName(domain_name(vm)).create()
        with pytest.raises(queue.Empty):
            reporter.next_guest(vm, timeout_s=1.0)
    finally:
        conn.lookupByName(domain_name(vm)).destroy()
        conn.lookupByName(domain_name(vm)).undefine()
        conn.close()
    assert reporter.next_guest(vm)[0]["state"] == "deleted"  # a vanished name is still news


def test_beat_sends_a_timed_sample_and_every_guest(driver: LibvirtDriver, vm: str) -> None:
    reporter = Recorder()
    agent = HostAgent("agent-host", driver, reporter)
    driver.define(config(vm))
    agent.beat()
    host, stats, guests = reporter.beats.get(timeout=1)
    assert host == "agent-host"
    assert {"cpu_load", "memory_used_mib", "guests", "time"} <= set(stats)
    assert {g["vm_id"]: g["state"] for g in guests}[vm] == "stopped"


def test_a_polled_driver_has_no_events(tmp_path: Path) -> None:
    sim = make_sim_driver(tmp_path, host="polled")
    agent = HostAgent("polled", sim, Recorder())
    assert agent.watch() is False
    with pytest.raises(NotSupported, match="polled"):
        sim.subscribe(lambda _event: None)
    agent.close()
