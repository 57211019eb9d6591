"""Names of NovaCron's Ray actors and resources (one place, so every caller agrees)."""

from __future__ import annotations

CONTROLLER = "controller"
HOST_RESOURCE_PREFIX = "novacron.host/"


def host_actor(host: str) -> str:
    """The Ray actor name of a host's HostActor."""
    return f"host:{host}"


def vm_actor(vm_id: str) -> str:
    """The Ray actor name of a VM's VMActor."""
    return f"vm:{vm_id}"


def host_resource(host: str) -> str:
    """The custom resource a Ray node advertises to say it is hypervisor ``host``."""
    return f"{HOST_RESOURCE_PREFIX}{host}"


def migration_actor(migration_id: str) -> str:
    """The Ray actor name of a migration's MigrationActor."""
    return f"mig:{migration_id}"
