"""Start and stop NovaCron's control plane on a running Ray cluster (used by the CLI and tests)."""

from __future__ import annotations

import logging
from typing import Any

import ray

from actors import names, options
from actors.controller import ClusterController
from novacron.access import Caller
from novacron.config import ADMIN_TOKEN_FILE, Settings
from novacron.errors import Unauthenticated, Unavailable
from novacron.model import HostCreate, Resources

log = logging.getLogger("novacron.actors.runtime")

# The embedded default's simulated hosts: a few different sizes, so placement has choices.
SIM_HOST_SHAPES = [(8, 16384, 200), (16, 32768, 500), (4, 8192, 100), (32, 65536, 1000)]


def find_controller(namespace: str) -> Any | None:
    """The running controller's handle, or None."""
    try:
        return ray.get_actor(names.CONTROLLER, namespace=namespace)
    except ValueError:
        return None


def start_control_plane(settings: Settings, *, timeout_s: float = 120.0) -> Any:
    """Start (or find) the controller; on an empty store, register ``settings.sim_hosts`` hosts."""
    cls: Any = ray.remote(ClusterController)
    handle: Any = cls.options(**options.controller_options(settings.namespace)).remote(
        settings.model_dump(mode="json"))
    ping: dict[str, Any] = ray.get(handle.ping.remote(), timeout=timeout_s)
    if ping["state_dir"] != str(settings.state_dir):
        raise Unavailable(
            f"a NovaCron controller for {ping['state_dir']} already runs in namespace "
            f"{settings.namespace!r}; stop it first (novacron down)",
            details={"running_state_dir": ping["state_dir"]})
    if settings.sim_hosts and not ray.get(handle.ping.remote())["hosts"]:
        admin = Caller.with_token(admin_token(settings))
        for i in range(settings.sim_hosts):
            cpus, mem, disk = SIM_HOST_SHAPES[i % len(SIM_HOST_SHAPES)]
            capacity = {"cpus": cpus, "memory_mib": mem, "disk_gib": disk}
            ray.get(handle.call.remote("register_host", admin, HostCreate(
                name=f"sim-{i + 1}", driver="sim", capacity=Resources(**capacity),
                labels={"zone": f"zone-{i % 2 + 1}"}, config={"capacity": capacity})))
    return handle


def admin_token(settings: Settings) -> str:
    """The admin token the controller wrote into the state directory on its first start."""
    path = settings.state_dir / ADMIN_TOKEN_FILE
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise Unauthenticated(f"no admin token at {path}; set NOVACRON_TOKEN to a token "
                              "with the admin role") from exc


def stop_control_plane(namespace: str, *, stop_guests: bool = False) -> dict[str, int]:
    """Shut the controller and every agent down; guests keep running unless ``stop_guests``."""
    handle = find_controller(namespace)
    if handle is None:
        return {"vms": 0, "guests_stopped": 0}
    result: dict[str, int] = ray.get(handle.shutdown.remote(stop_guests), timeout=300)
    ray.kill(handle, no_restart=True)
    return result
