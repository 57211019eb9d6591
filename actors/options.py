"""The one factory of actor options: restarts, retries, CPUs and where each actor runs.

Every actor is restartable without limit (``max_restarts=-1``) and rebuilds itself from the store;
their methods are idempotent, so calls interrupted by a restart are retried (``max_task_retries``).
Actors that mostly wait take no CPU. HostActors and VMActors are detached, so they outlive a
restart of the controller that created them.
"""

from __future__ import annotations

from typing import Any

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors import names


def controller_options(namespace: str) -> dict[str, Any]:
    return {"name": names.CONTROLLER, "namespace": namespace, "lifetime": "detached",
            "get_if_exists": True, "max_restarts": -1, "max_task_retries": -1,
            "num_cpus": 0, "max_concurrency": 32}


def placement(host: str, node_id: str | None) -> dict[str, Any]:
    """Pin to the Ray node that is ``host`` (its custom resource) or, for a logical host with no
    node of its own, to ``node_id`` (the controller's node)."""
    if node_id is not None:
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
    return {"resources": {names.host_resource(host): 0.001}}


def host_options(namespace: str, host: str, node_id: str | None) -> dict[str, Any]:
    return {"name": names.host_actor(host), "namespace": namespace,
            "lifetime": "detached", "get_if_exists": True, "max_restarts": -1,
            "max_task_retries": -1, "num_cpus": 0, "max_concurrency": 4,
            **placement(host, node_id)}


def vm_options(namespace: str, vm_id: str, host: str, node_id: str | None) -> dict[str, Any]:
    return {"name": names.vm_actor(vm_id), "namespace": namespace, "lifetime": "detached",
            "get_if_exists": True, "max_restarts": -1, "max_task_retries": -1, "num_cpus": 0,
            "max_concurrency": 4, **placement(host, node_id)}


def probe_options(host: str, node_id: str | None) -> dict[str, Any]:
    return {"num_cpus": 0, "max_retries": 0, **placement(host, node_id)}


def migration_options(namespace: str, migration_id: str, source: str,
                      node_id: str | None) -> dict[str, Any]:
    """A MigrationActor runs beside its source host. Its constructor starts the run, so a
    restart resumes it; its methods are only queries."""
    return {"name": names.migration_actor(migration_id), "namespace": namespace,
            "lifetime": "detached", "get_if_exists": True, "max_restarts": -1,
            "max_task_retries": -1, "num_cpus": 0, "max_concurrency": 2,
            **placement(source, node_id)}


def migration_target_options(target: str, node_id: str | None) -> dict[str, Any]:
    """A migration's end on its target host (``actors/migration/stream.py``), owned by its
    MigrationActor (it ends with it). It runs one call at a time, in order; restarted if it
    crashes, but a call in flight then fails instead of being retried: a page batch applied out
    of order could leave a stale page, so the migration rolls back."""
    return {"num_cpus": 0, "max_restarts": -1, "max_task_retries": 0, "max_concurrency": 1,
            **placement(target, node_id)}
