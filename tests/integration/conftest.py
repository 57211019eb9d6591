"""A NovaCron control plane on the session's Ray, one per test, with its own namespace; the real
libvirt tier's machine, one per session (:mod:`tests.integration.libvirt_env`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

from actors.runtime import start_control_plane, stop_control_plane
from novacron.client import NovaCron, connect
from novacron.config import Settings
from novacron.model import HostCreate
from tests.conftest import kill_guests_under, sim_host_config
from tests.integration.libvirt_env import LibvirtEnv, session


@dataclass
class Running:
    """A running control plane and a driver-API connection to it."""

    settings: Settings
    nc: NovaCron

    @property
    def controller(self) -> Any:
        return ray.get_actor("controller", namespace=self.settings.namespace)

    def actor(self, name: str) -> Any:
        return ray.get_actor(name, namespace=self.settings.namespace)


def settings_for(state_dir: Path, namespace: str) -> Settings:
    return Settings(state_dir=state_dir, namespace=namespace, sim_hosts=0,
                    heartbeat_interval_s=0.25, heartbeat_misses=8, reconcile_interval_s=0.25,
                    converge_timeout_s=10, stop_timeout_s=5)


def start(settings: Settings, hosts: int = 2) -> Running:
    start_control_plane(settings)
    nc = connect(namespace=settings.namespace, state_dir=settings.state_dir)
    if not nc.hosts.list():
        for i in range(hosts):
            nc.call("register_host", HostCreate(
                name=f"h{i + 1}", driver="sim",
                config=sim_host_config(settings.state_dir, cpus=4, memory_mib=4096)))
    return Running(settings, nc)


@pytest.fixture
def running(ray_session: None, state_dir: Path) -> Iterator[Running]:
    settings = settings_for(state_dir, f"nc-{uuid.uuid4().hex[:8]}")
    yield start(settings)
    stop_control_plane(settings.namespace, stop_guests=True)
    kill_guests_under(state_dir)


@pytest.fixture(scope="session")
def libvirt_env() -> Iterator[LibvirtEnv]:
    """Real libvirt daemons, the tiny guest and a template, held for the whole session."""
    yield from session()
