"""PlacementEngine: choices, explanations, batches, caching and fleet slices (no Ray)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from novacron.errors import InvalidRequest, NoCapacity, NotFound
from novacron.model import Host, Overcommit, Resources
from novacron.placement import (
    Affinity,
    Decision,
    HostFleet,
    InstanceType,
    PlacementEngine,
    PlacementRequest,
    VMPlacementInfo,
    merge_shards,
    select_host,
)
from novacron.placement.fleet import TENANTS_LABEL
from novacron.states import HostState

GIB = 1024


def host(name: str, cpus: float = 16, mem_gib: int = 64, disk: int = 500, gpus: int = 0, *,
         state: HostState = HostState.UP, labels: dict[str, str] | None = None,
         cpu_overcommit: float = 1.0, used: Resources | None = None, driver: str = "sim",
         config: dict[str, Any] | None = None, revision: int = 0) -> Host:
    return Host(name=name, driver=driver,
                capacity=Resources(cpus=cpus, memory_mib=mem_gib * GIB, disk_gib=disk, gpus=gpus),
                overcommit=Overcommit(cpu=cpu_overcommit), state=state, labels=labels or {},
                allocated=used or Resources.zero(), config=config or {}, revision=revision)


def req(cpus: float = 1, mem_gib: int = 1, disk: int = 10, gpus: int = 0,
        **options: Any) -> PlacementRequest:
    return PlacementRequest(Resources(cpus=cpus, memory_mib=mem_gib * GIB, disk_gib=disk,
                                      gpus=gpus), **options)


def used(cpus: float, mem_gib: int, disk: int = 0) -> Resources:
    return Resources(cpus=cpus, memory_mib=mem_gib * GIB, disk_gib=disk)


def refusal(engine: PlacementEngine, request: PlacementRequest) -> NoCapacity:
    with pytest.raises(NoCapacity) as info:
        engine.place(request)
    return info.value


# -- choosing ---------------------------------------------------------------------------------
def test_prefers_the_host_in_use_that_ends_fullest() -> None:
    engine = PlacementEngine.from_hosts([
        host("empty"), host("half", used=used(8, 32)), host("most", used=used(12, 48))])
    decision = engine.place(req(2, 8))
    assert decision.host == "most"
    assert decision.candidates == 3
    assert set(decision.breakdown) == {"binpack", "tetris", "stranded", "spread",
                                       "least_loaded", "cost"}
    assert "most: score" in decision.explanation
    assert "3/3 hosts" in decision.explanation


def test_opens_the_largest_empty_host_when_none_in_use_fits() -> None:
    engine = PlacementEngine.from_hosts([
        host("small", 8, 32), host("large", 64, 256), host("full", 8, 32, used=used(8, 32))])
    assert engine.place(req(2, 8)).host == "large"


def test_place_does_not_change_the_fleet_and_allocate_does() -> None:
    engine = PlacementEngine.from_hosts([host("a", 4, 8)])
    request = req(4, 8)
    first = engine.place(request)
    assert engine.place(request).host == first.host == "a"
    engine.allocate("a", request.resources, revision=7)
    error = refusal(engine, request)
    assert error.details["removed"] == {"insufficient cpus": 1}
    assert engine.fleet.host("a").revision == 7
    engine.release("a", request.resources)
    assert engine.place(request).host == "a"


def test_cpu_overcommit_is_honoured_but_memory_is_not_overcommitted() -> None:
    engine = PlacementEngine.from_hosts([host("a", 4, 16, cpu_overcommit=4.0)])
    assert engine.place(req(16, 16)).host == "a"
    assert refusal(engine, req(17, 1)).details["removed"] == {"insufficient cpus": 1}
    assert refusal(engine, req(1, 17)).details["removed"] == {"insufficient memory": 1}


def test_gpus_and_disk_are_filtered() -> None:
    engine = PlacementEngine.from_hosts([host("cpu"), host("gpu", gpus=2)])
    assert engine.place(req(gpus=2)).host == "gpu"
    error = refusal(engine, req(gpus=4))
    assert error.details["removed"] == {"insufficient gpus": 2}
    assert refusal(engine, req(disk=600)).details["removed"] == {"insufficient disk": 2}


# -- explaining -------------------------------------------------------------------------------
def test_refusal_counts_each_host_once_by_the_first_filter_that_removed_it() -> None:
    hosts = [host(f"small{i}", 4, 4) for i in range(3)]
    hosts += [host("drain", state=HostState.DRAINING), host("maint", state=HostState.MAINTENANCE),
              host("gone", state=HostState.UNREACHABLE)]
    hosts += [host("busy", used=used(0, 63)), host("member", labels={})]
    engine = PlacementEngine.from_hosts(
        hosts, {"member": [VMPlacementInfo("vm-1", group="db")]})
    error = refusal(engine, req(2, 8, group="db"))
    assert error.message == ("0/8 hosts fit: 4 insufficient memory, 1 anti-affinity, "
                             "1 draining, 1 maintenance, 1 unreachable")
    assert error.details["hosts"] == 8
    assert error.details["removed"] == {"insufficient memory": 4, "anti-affinity": 1,
                                        "draining": 1, "maintenance": 1, "unreachable": 1}
    assert error.details["request"]["group"] == "db"


def test_refusal_of_an_empty_fleet() -> None:
    assert refusal(PlacementEngine.from_hosts([]), req()).message == (
        "0/0 hosts fit: the fleet is empty")


# -- constraints ------------------------------------------------------------------------------
def test_pinned_and_excluded_hosts() -> None:
    engine = PlacementEngine.from_hosts([host("a"), host("b", used=used(8, 8))])
    assert engine.place(req(host="a")).host == "a"
    assert engine.place(req(exclude_hosts=frozenset({"b"}))).host == "a"
    error = refusal(engine, req(host="nowhere"))
    assert error.details["removed"] == {"not the requested host": 2}


def test_label_selector() -> None:
    engine = PlacementEngine.from_hosts([
        host("hdd", labels={"ssd": "false"}), host("ssd", labels={"ssd": "true", "zone": "a"}),
        host("nolabel", used=used(8, 8))])
    assert engine.place(req(labels={"ssd": "true"})).host == "ssd"
    assert engine.place(req(labels={"ssd": ["true", "false"], "zone": "a"})).host == "ssd"
    assert refusal(engine, req(labels={"zone": "b"})).details["removed"] == {
        "label selector": 3}


def test_capabilities_by_host_or_by_driver() -> None:
    engine = PlacementEngine.from_hosts(
        [host("sim1", used=used(8, 32)), host("kvm1", driver="libvirt"), host("odd")],
        capabilities={"odd": ["live_migration"]},
        driver_capabilities={"libvirt": ["live_migration", "snapshot"], "sim": ["snapshot"]})
    ask = req(capabilities=frozenset({"live_migration", "snapshot"}))
    assert engine.place(ask).host == "kvm1"
    assert engine.place(req(capabilities=frozenset({"snapshot"}))).host == "sim1"
    error = refusal(engine, req(capabilities=frozenset({"gpu_passthrough"})))
    assert error.details["removed"] == {"missing capability": 3}


def test_dedicated_hosts_take_only_their_tenants() -> None:
    engine = PlacementEngine.from_hosts([
        host("shared", 8, 8), host("acme-only", 64, 256, labels={TENANTS_LABEL: "acme, beta"})])
    assert engine.place(req(tenant="acme")).host == "acme-only"
    assert engine.place(req(tenant="beta")).host == "acme-only"
    assert engine.place(req(tenant="other")).host == "shared"
    assert engine.place(req()).host == "shared"


def test_tenant_restricted_to_allowed_hosts() -> None:
    engine = PlacementEngine.from_hosts([host("a"), host("b", used=used(8, 8))])
    assert engine.place(req(allowed_hosts=frozenset({"a"}))).host == "a"
    error = refusal(engine, req(allowed_hosts=frozenset({"zzz"})))
    assert error.details["removed"] == {"tenant restriction": 2}


def test_cloud_host_needs_a_fitting_instance_type_from_config_or_argument() -> None:
    types = [{"name": "m5.large", "cpus": 2, "memory_mib": 8 * GIB, "price_per_hour": 0.1}]
    engine = PlacementEngine.from_hosts(
        [host("aws", 256, 1024, driver="aws", config={"instance_types": types}),
         host("gcp", 256, 1024, driver="gcp")],
        instance_types={"gcp": [InstanceType("n2-highmem-8", 8, 64 * GIB, 0, 0.5)]})
    assert engine.place(req(2, 8)).host == "aws"  # the cheaper fitting instance
    assert engine.place(req(4, 32)).host == "gcp"
    assert refusal(engine, req(16, 8)).details["removed"] == {"no instance type fits": 2}


def test_a_cloud_drivers_type_patterns_are_not_types() -> None:
    engine = PlacementEngine.from_hosts([host("aws", 4, 16, driver="aws",
                                              config={"instance_types": ["t3.*", "m5.*"]})])
    assert engine.place(req(2, 8)).host == "aws"  # bounded by its capacity only


def test_bad_instance_types_config_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        HostFleet([host("aws", config={"instance_types": [{"name": "x", "bogus": 1}]})])


def test_duplicate_host_names_are_refused() -> None:
    with pytest.raises(InvalidRequest):
        HostFleet([host("a"), host("a")])


# -- groups -----------------------------------------------------------------------------------
def place_all(engine: PlacementEngine, requests: list[PlacementRequest]) -> list[str]:
    names = []
    for r in requests:
        d = engine.place(r)
        engine.allocate(d.host, d.resources, group=r.group)
        names.append(d.host)
    return names


def test_hard_anti_affinity_by_host() -> None:
    engine = PlacementEngine.from_hosts([host(f"h{i}") for i in range(3)])
    names = place_all(engine, [req(group="web")] * 3)
    assert len(set(names)) == 3
    assert refusal(engine, req(group="web")).details["removed"] == {"anti-affinity": 3}
    assert engine.place(req(group="other")).host in names


def test_hard_anti_affinity_by_failure_domain_needs_the_label() -> None:
    hosts = [host("a1", labels={"rack": "a"}), host("a2", labels={"rack": "a"}),
             host("b1", labels={"rack": "b"}), host("none")]
    engine = PlacementEngine.from_hosts(hosts)
    names = place_all(engine, [req(group="db", domain="rack")] * 2)
    assert sorted(engine.fleet.label_of(engine.fleet.index[n], "rack") or "" for n in names) == [
        "a", "b"]
    error = refusal(engine, req(group="db", domain="rack"))
    assert error.details["removed"] == {"anti-affinity": 3, "missing rack label": 1}
    error = refusal(engine, req(group="x", domain="zone"))
    assert error.details["removed"] == {"missing zone label": 4}


def test_soft_anti_affinity_spreads_when_it_can_and_stacks_when_it_must() -> None:
    engine = PlacementEngine.from_hosts([host("a"), host("b")])
    names = place_all(engine, [req(group="g", hard=False)] * 3)
    assert set(names) == {"a", "b"}


def test_hard_affinity_keeps_the_group_together() -> None:
    engine = PlacementEngine.from_hosts([host("a", used=used(4, 4)), host("b", 64, 256)])
    names = place_all(engine, [req(group="pair", affinity=Affinity.AFFINITY)] * 2)
    assert names[0] == names[1]
    filled = engine.fleet.host(names[0])
    engine.allocate(names[0], used(filled.limit.cpus - filled.allocated.cpus, 0))
    error = refusal(engine, req(group="pair", affinity=Affinity.AFFINITY))
    assert error.details["removed"] == {"affinity": 1, "insufficient cpus": 1}


def test_soft_affinity_prefers_the_group_host_over_a_fuller_one() -> None:
    engine = PlacementEngine.from_hosts([host("a", used=used(1, 1)), host("b", used=used(12, 48))],
                                        {"a": [VMPlacementInfo("vm-1", "pair")]})
    assert engine.place(req(group="pair", affinity=Affinity.AFFINITY, hard=False)).host == "a"
    assert engine.place(req()).host == "b"


def test_domain_affinity_stays_in_the_members_zone() -> None:
    hosts = [host("z1a", labels={"zone": "1"}), host("z1b", labels={"zone": "1"}),
             host("z2", 64, 256, labels={"zone": "2"})]
    engine = PlacementEngine.from_hosts(hosts, {"z1a": [VMPlacementInfo("vm", "g")]})
    engine.allocate("z1a", used(16, 0))
    ask = req(group="g", affinity=Affinity.AFFINITY, domain="zone")
    assert engine.place(ask).host == "z1b"


# -- weights ----------------------------------------------------------------------------------
def test_request_weights_override_the_cluster_weights() -> None:
    hosts = [host("busy", used=used(8, 32)), host("idle")]
    engine = PlacementEngine.from_hosts(hosts, {"busy": [VMPlacementInfo("vm")]})
    assert engine.place(req()).host == "busy"
    spread_only = {"binpack": 0, "tetris": 0, "stranded": 0, "cost": 0, "least_loaded": 0}
    assert engine.place(req(weights={**spread_only, "spread": 1})).host == "idle"
    spread_engine = PlacementEngine(engine.fleet, weights={**spread_only, "spread": 1})
    assert spread_engine.place(req()).host == "idle"


def test_least_loaded_and_cost_weights() -> None:
    hosts = [host("a", config={"cost_per_hour": 10.0}), host("b", config={"cost_per_hour": 1.0})]
    only = {"binpack": 0, "tetris": 0, "stranded": 0, "spread": 0, "least_loaded": 0, "cost": 0}
    engine = PlacementEngine.from_hosts(hosts, load={"a": 0.1, "b": 0.9})
    assert engine.place(req(weights={**only, "least_loaded": 1})).host == "a"
    assert engine.place(req(weights={**only, "cost": 1})).host == "b"


@pytest.mark.parametrize("weights", [{"bogus": 1.0}, {"spread": -1.0}])
def test_bad_weights_are_refused(weights: dict[str, float]) -> None:
    engine = PlacementEngine.from_hosts([host("a")])
    with pytest.raises(InvalidRequest):
        engine.place(req(weights=weights))


# -- batches ----------------------------------------------------------------------------------
def test_batch_places_largest_first_reserves_and_keeps_the_input_order() -> None:
    engine = PlacementEngine.from_hosts([host("a", 8, 32, revision=4), host("b", 8, 32)])
    requests = [req(2, 8), req(6, 24), req(2, 8), req(6, 24)]
    results = engine.place_batch(requests)
    decisions = [r for r in results if isinstance(r, Decision)]
    assert len(decisions) == 4  # a perfect fit needs the large VMs placed first
    assert [d.resources for d in decisions] == [r.resources for r in requests]
    assert engine.fleet.vm_count.tolist() == [2, 2]
    assert engine.fleet.free[:2].sum() == 0
    assert all(d.base_allocated == Resources.zero() for d in decisions)
    assert {d.host: d.revision for d in decisions} == {"a": 4, "b": 0}


def test_batch_puts_refusals_in_their_slots() -> None:
    engine = PlacementEngine.from_hosts([host("a", 4, 8)])
    results = engine.place_batch([req(4, 8), req(4, 8), req(64, 8)])
    assert isinstance(results[0], Decision) != isinstance(results[1], Decision)
    assert isinstance(results[2], NoCapacity)
    assert results[2].details["removed"] == {"insufficient cpus": 1}


def test_batch_packs_as_well_as_first_fit_decreasing_on_a_classic_case() -> None:
    # Items 6,5,4,3,2 (x2) into bins of 10: FFD needs 4 bins.
    engine = PlacementEngine.from_hosts([host(f"h{i}", 10, 100, 100) for i in range(8)])
    sizes = [2, 3, 4, 5, 6, 2, 3, 4, 5, 6]
    engine.place_batch([req(c, 10 * c, 10 * c) for c in sizes])
    assert int((engine.fleet.vm_count > 0).sum()) == 4


# -- keeping the fleet current ----------------------------------------------------------------
def test_update_host_state_labels_and_capacity_invalidate_cached_scores() -> None:
    engine = PlacementEngine.from_hosts([host("a", used=used(8, 32)), host("b")])
    assert engine.place(req()).host == "a"
    engine.update_host(host("a", state=HostState.DRAINING, used=used(8, 32), revision=3))
    assert engine.place(req()).host == "b"
    engine.update_host(host("a", used=used(8, 32), labels={"ssd": "true"}))
    assert engine.place(req(labels={"ssd": "true"})).host == "a"
    engine.update_host(host("b", used=used(12, 48), revision=9))  # allocation only
    assert engine.place(req()).host == "b"
    assert engine.fleet.host("b").revision == 9


def test_add_and_remove_hosts() -> None:
    engine = PlacementEngine.from_hosts([host("a", 4, 4)], {"a": [VMPlacementInfo("v", "g")]},
                                        driver_capabilities={"libvirt": ["live_migration"]})
    assert refusal(engine, req(8, 8)).details["removed"] == {"insufficient cpus": 1}
    engine.update_host(host("big", 64, 256), capabilities=["live_migration"])
    assert engine.place(req(8, 8, capabilities=frozenset({"live_migration"}))).host == "big"
    engine.update_host(host("kvm", 128, 512, driver="libvirt"))  # its driver's capabilities
    assert engine.place(req(80, 8, capabilities=frozenset({"live_migration"}))).host == "kvm"
    engine.remove_host("a")
    assert engine.fleet.names == ["big", "kvm"]
    assert engine.fleet.group_members("g") == {}
    with pytest.raises(NotFound):
        engine.allocate("a", used(1, 1))


def test_vms_by_host_counts_vms_and_group_members() -> None:
    fleet = HostFleet([host("a"), host("b")],
                      {"a": [VMPlacementInfo("v1", "g"), VMPlacementInfo("v2")]})
    assert fleet.vm_count.tolist() == [2, 0]
    assert fleet.group_members("g") == {0: 1}
    assert fleet.in_use.tolist() == [True, False]


def test_select_host_returns_the_host_record() -> None:
    hosts = [host("a", 2, 2), host("b")]
    assert select_host(req(4, 4), hosts) is hosts[1]


# -- slices of the fleet ----------------------------------------------------------------------
def test_scoring_slices_and_merging_matches_the_whole_fleet() -> None:
    hosts = [host(f"h{i}", 8 + 4 * (i % 5), 32, labels={"rack": f"r{i // 4}"},
                  used=used(i % 6, i % 7)) for i in range(23)]
    vms = {"h5": [VMPlacementInfo("v1", "db")], "h9": [VMPlacementInfo("v2", "db")]}
    whole = PlacementEngine.from_hosts(hosts, vms)
    for request in (req(2, 4), req(2, 4, group="db"), req(2, 4, group="db", domain="rack"),
                    req(2, 4, group="db", domain="rack", hard=False)):
        context = whole.group_context(request)
        parts = [pickle.loads(pickle.dumps(part)) for part in whole.fleet.split(4)]
        results = [PlacementEngine(part).score(request, context) for part in parts]
        merged = merge_shards(results, request)
        direct = whole.place(request)
        assert merged.host == direct.host
        assert merged.score == pytest.approx(direct.score)
        assert merged.revision == direct.revision


def test_merging_slices_where_nothing_fits_sums_the_reasons() -> None:
    whole = PlacementEngine.from_hosts([host(f"h{i}", 2, 2) for i in range(5)]
                                       + [host("d", state=HostState.DRAINING)])
    request = req(4, 4)
    results = [PlacementEngine(p).score(request, None) for p in whole.fleet.split(3)]
    with pytest.raises(NoCapacity) as info:
        merge_shards(results, request)
    assert info.value.details["removed"] == {"insufficient cpus": 5, "draining": 1}
    assert info.value.message.startswith("0/6 hosts fit")


def test_a_slice_scores_at_the_allocations_it_is_given() -> None:
    whole = PlacementEngine.from_hosts([host("a", 8, 32), host("b", 8, 32)])
    part = whole.fleet.split(1)[0]
    whole.allocate("b", used(4, 16))
    shipped = pickle.loads(pickle.dumps(part))
    shipped.load_dynamic(whole.fleet.dynamic())
    result = PlacementEngine(shipped).score(req(2, 8), None)
    assert (result.host, result.allocated) == ("b", used(4, 16))
