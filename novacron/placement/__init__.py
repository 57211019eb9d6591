"""Placement: choose a host for each VM with vectorized filters and weighers (pure, no Ray).

For the controller::

    engine = PlacementEngine.from_hosts(hosts, vms_by_host,    # model.Host, VMPlacementInfo
                                        driver_capabilities={"libvirt": [...], ...})
    decision = engine.place(PlacementRequest(spec.resources, group="db", domain="rack"))
    # Decision(host, score, explanation, resources, revision, base_allocated, ...)
    (write,) = plan_commit([decision])  # HostWrite(host, expected_revision, allocated)
    revision = store_conditional_write(write)     # RevisionMismatch: update_host, retry
    engine.allocate(decision.host, decision.resources, group="db", revision=revision)
    # or all of it: place_and_commit(engine, request, write, fetch)

``engine.place_batch(requests)`` places many VMs (largest first; equivalence classes share
cached scores), reserving each in the fleet; commit them with
``commit_batch(engine, plan_commit(decisions), write, fetch)``. Keep the fleet current with
``allocate``/``release`` (a VM added or removed), ``update_host`` (a host record changed, or a new
host), ``remove_host`` and ``set_load``. ``select_host(request, hosts)`` is the one-shot
convenience. A refusal raises :class:`~novacron.errors.NoCapacity` whose message reads
``'0/5000 hosts fit: 3120 insufficient memory, 1700 anti-affinity, 180 draining'`` and whose
details are ``{"hosts": N, "removed": {reason: count}, "request": {...}}``. For very large fleets
``actors.scoring_tasks.ShardedScorer`` scores slices of the fleet in Ray tasks.

Modules: ``request`` (what is asked, weights), ``fleet`` (hosts as arrays, adapters from
``model.Host``), ``filters`` and ``weighers`` (pure functions over arrays), ``explain`` (filter
order and reasons), ``engine`` (caching and choice), ``commit`` (optimistic writes against host
revisions).
"""

from novacron.placement.commit import HostWrite, commit_batch, place_and_commit, plan_commit
from novacron.placement.engine import (
    Decision,
    GroupContext,
    PlacementEngine,
    ShardResult,
    merge_shards,
    select_host,
)
from novacron.placement.fleet import HostFleet, InstanceType, VMPlacementInfo
from novacron.placement.request import DEFAULT_WEIGHTS, Affinity, PlacementRequest

__all__ = [
    "DEFAULT_WEIGHTS",
    "Affinity",
    "Decision",
    "GroupContext",
    "HostFleet",
    "HostWrite",
    "InstanceType",
    "PlacementEngine",
    "PlacementRequest",
    "ShardResult",
    "VMPlacementInfo",
    "commit_batch",
    "merge_shards",
    "place_and_commit",
    "plan_commit",
    "select_host",
]
