"""The HTTP API served by Ray Serve on 127.0.0.1, over the session's Ray."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from actors.runtime import admin_token, start_control_plane, stop_control_plane
from novacron.access import Caller
from novacron.config import Settings
from novacron.model import HostCreate
from serve.deployment import deploy, undeploy
from tests.conftest import kill_guests_under, sim_host_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def http(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """An HTTP client for a running NovaCron API with two sim hosts."""
    import ray

    state_dir: Path = tmp_path_factory.mktemp("e2e-state")
    settings = Settings(state_dir=state_dir, namespace=f"nc-e2e-{uuid.uuid4().hex[:6]}",
                        sim_hosts=0, api_port=free_port(), heartbeat_interval_s=0.25,
                        reconcile_interval_s=0.25, stop_timeout_s=5)
    controller = start_control_plane(settings)
    admin = admin_token(settings)
    for name, cpus in (("e1", 2), ("e2", 4)):
        ray.get(controller.call.remote("register_host", Caller.with_token(admin), HostCreate(
            name=name, driver="sim", config=sim_host_config(state_dir, cpus=cpus))))
    deploy(settings)
    base = f"http://127.0.0.1:{settings.api_port}"
    with httpx.Client(base_url=base, timeout=30,
                      headers={"Authorization": f"Bearer {admin}"}) as client:
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the API never became ready"
            time.sleep(0.3)
        yield client
    undeploy()
    stop_control_plane(settings.namespace, stop_guests=True)
    kill_guests_under(state_dir)
