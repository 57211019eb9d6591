"""Placement benchmark: NovaCron's vectorized engine against a plain loop and first-fit-decreasing.

5,000 heterogeneous hosts (general, compute, memory and GPU servers, a few cloud regions with
instance-type catalogues; some draining, in maintenance, unreachable or dedicated to a tenant)
and 10,000 VMs drawn with a fixed seed from a cloud-trace-like mix (many small VMs, few large;
label selectors, capability requirements, tenant restrictions, hard and soft anti-affinity groups
by host, rack and zone, soft affinity pairs). Every filter and weigher is on.

Figures, all from one run:

* NovaCron ``place_batch`` throughput (placements/s) and hosts in use afterwards;
* latency of single ``place`` calls (p50/p99) on the loaded fleet, as the controller calls it;
* the plain per-VM Python loop over all hosts with the same filters and weights (speed
  baseline, on a sample of the batch; it must choose the same hosts);
* first-fit-decreasing over the same batch with full knowledge of it (packing baseline);
* how batch and single placement time grow from 500 to 5,000 to 20,000 hosts;
* with ``--ray``, single placements scored in Ray tasks over slices of 20,000 hosts.

Run from the repository root:
``.venv/bin/python -m benchmarks.placement [--json] [--quick] [--ray]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from novacron.errors import NoCapacity
from novacron.model import Host, Overcommit, Resources
from novacron.placement import (
    Affinity,
    Decision,
    HostFleet,
    InstanceType,
    PlacementEngine,
    PlacementRequest,
    filters,
)
from novacron.placement.explain import capacity_chain, group_chain, static_chain
from novacron.placement.fleet import TENANTS_LABEL, demand_vector
from novacron.placement.request import DEFAULT_WEIGHTS, WEIGHER_NAMES
from novacron.states import HostState

SEED = 20261126
GIB = 1024
LIVE = "live_migration"
TARGETS = {"placements_per_s": 5000.0, "p99_ms": 2.0, "speedup_vs_loop": 10.0,
           "hosts_vs_ffd": 1.02}

# name, share of the fleet, cpus, memory GiB, disk GiB, gpus, cost per hour
HOST_TYPES = [
    ("general-32", 0.34, 32, 128, 1000, 0, 1.0),
    ("general-64", 0.30, 64, 256, 2000, 0, 1.8),
    ("compute-96", 0.12, 96, 192, 1000, 0, 2.2),
    ("memory-64", 0.15, 64, 768, 2000, 0, 3.0),
    ("gpu-48", 0.05, 48, 384, 2000, 8, 8.0),
    ("cloud", 0.01, 64, 256, 4000, 1, 0.0),
]
CLOUD_TYPES = (
    InstanceType("m5.large", 2, 8 * GIB, 0, 0.096),
    InstanceType("m5.xlarge", 4, 16 * GIB, 0, 0.192),
    InstanceType("m5.2xlarge", 8, 32 * GIB, 0, 0.384),
    InstanceType("m5.4xlarge", 16, 64 * GIB, 0, 0.768),
    InstanceType("r5.4xlarge", 16, 128 * GIB, 0, 1.008),
    InstanceType("c5.9xlarge", 36, 72 * GIB, 0, 1.53),
    InstanceType("p3.2xlarge", 8, 61 * GIB, 1, 3.06),
)
# cpus and their shares; memory GiB per cpu; disk GiB (cloud-trace-like: many small VMs)
VM_CPUS = ((1, 0.30), (2, 0.32), (4, 0.20), (8, 0.11), (16, 0.05), (32, 0.02))
VM_MEM_PER_CPU = ((1, 0.15), (2, 0.35), (4, 0.35), (8, 0.15))
VM_DISK = ((16, 0.3), (32, 0.3), (64, 0.2), (128, 0.15), (512, 0.05))
RACK_SIZE = 20


@dataclass
class Scenario:
    hosts: list[Host]
    capabilities: dict[str, frozenset[str]]
    instance_types: dict[str, tuple[InstanceType, ...]]
    load: dict[str, float]
    requests: list[PlacementRequest]

    def engine(self) -> PlacementEngine:
        return PlacementEngine.from_hosts(self.hosts, capabilities=self.capabilities,
                                          instance_types=self.instance_types, load=self.load)


def _pick(rng: np.random.Generator, table: Sequence[tuple[Any, float]], size: int) -> list[Any]:
    p = np.array([w for _, w in table])
    return [table[i][0] for i in rng.choice(len(table), size=size, p=p / p.sum())]


def make_scenario(n_hosts: int, n_vms: int, seed: int = SEED) -> Scenario:
    """A fleet of ``n_hosts`` and a batch of ``n_vms`` requests, the same for a given seed."""
    rng = np.random.default_rng(seed)
    hosts: list[Host] = []
    caps: dict[str, frozenset[str]] = {}
    types: dict[str, tuple[InstanceType, ...]] = {}
    load: dict[str, float] = {}
    shares = np.array([t[1] for t in HOST_TYPES])
    kinds = rng.choice(len(HOST_TYPES), size=n_hosts, p=shares / shares.sum())
    for i, k in enumerate(kinds):
        kind, _, cpus, mem, disk, gpus, cost = HOST_TYPES[k]
        name = f"{kind}-{i:05d}"
        labels = {"zone": f"z{i % 3}", "rack": f"r{i // RACK_SIZE:04d}",
                  "ssd": "true" if rng.random() < 0.5 else "false"}
        roll = rng.random()
        state = (HostState.DRAINING if roll < 0.015 else HostState.MAINTENANCE if roll < 0.025
                 else HostState.UNREACHABLE if roll < 0.03 else HostState.UP)
        if kind == "cloud":
            driver, overcommit = "aws", Overcommit(cpu=1.0)
            types[name] = CLOUD_TYPES
            caps[name] = frozenset({"snapshot"})
        else:
            driver = "libvirt" if rng.random() < 0.9 else "sim"
            overcommit = Overcommit(cpu=float(rng.choice([1.0, 2.0, 4.0])))
            caps[name] = frozenset({LIVE, "snapshot"} if driver == "libvirt" else {"snapshot"})
            if rng.random() < 0.02:
                labels[TENANTS_LABEL] = "acme"
        hosts.append(Host(name=name, driver=driver, capacity=Resources(
            cpus=cpus, memory_mib=mem * GIB, disk_gib=disk, gpus=gpus), overcommit=overcommit,
            labels=labels, state=state, config={"cost_per_hour": cost}))
        load[name] = float(rng.uniform(0.0, 0.8))
    beta_hosts = frozenset(h.name for h in hosts[: max(1, n_hosts // 10)])
    cpus = _pick(rng, VM_CPUS, n_vms)
    per_cpu = _pick(rng, VM_MEM_PER_CPU, n_vms)
    disks = _pick(rng, VM_DISK, n_vms)
    requests: list[PlacementRequest] = []
    grouped = _groups(rng, n_vms)
    for k in range(n_vms):
        gpus = 0
        c, mem = cpus[k], cpus[k] * per_cpu[k]
        if rng.random() < 0.005:
            c, mem, gpus = 8, 60, int(rng.integers(1, 3))
        roll = rng.random()
        tenant = "acme" if roll < 0.05 else "beta" if roll < 0.07 else f"t{k % 50}"
        group, affinity, hard, domain = grouped.get(k, (None, Affinity.ANTI_AFFINITY, True, None))
        requests.append(PlacementRequest(
            Resources(cpus=c, memory_mib=mem * GIB, disk_gib=disks[k], gpus=gpus),
            labels={"ssd": "true"} if rng.random() < 0.10 else {},
            capabilities=frozenset({LIVE}) if rng.random() < 0.15 else frozenset(),
            tenant=tenant, allowed_hosts=beta_hosts if tenant == "beta" else None,
            group=group, affinity=affinity, hard=hard, domain=domain))
    return Scenario(hosts, caps, types, load, requests)


def _groups(rng: np.random.Generator,
            n_vms: int) -> dict[int, tuple[str, Affinity, bool, str | None]]:
    """Group membership of some VMs: anti-affinity groups of 3-5 (hard by host or rack, soft by
    zone) covering ~16% of the VMs, and soft affinity pairs covering ~1%."""
    members = rng.permutation(n_vms)
    out: dict[int, tuple[str, Affinity, bool, str | None]] = {}
    pos = 0
    for g in range(n_vms // 25):
        size = int(rng.integers(3, 6))
        roll = rng.random()
        policy = ((True, None) if roll < 0.5 else (True, "rack") if roll < 0.8
                  else (False, "zone"))
        for k in members[pos:pos + size]:
            out[int(k)] = (f"anti-{g}", Affinity.ANTI_AFFINITY, *policy)
        pos += size
    for g in range(n_vms // 200):
        for k in members[pos:pos + 2]:
            out[int(k)] = (f"pair-{g}", Affinity.AFFINITY, False, None)
        pos += 2
    return out


# -- NovaCron -----------------------------------------------------------------------------------
def run_batch(s: Scenario) -> tuple[PlacementEngine, float, int, int]:
    """Seconds for ``place_batch`` of the whole batch, hosts in use, and requests refused."""
    engine = s.engine()
    gc.collect()
    t0 = time.perf_counter()
    results = engine.place_batch(s.requests)
    elapsed = time.perf_counter() - t0
    refused = sum(1 for r in results if not hasattr(r, "host"))
    return engine, elapsed, int(np.count_nonzero(engine.fleet.vm_count)), refused


def single_latencies(engine: PlacementEngine, requests: Sequence[PlacementRequest],
                     cold: bool = False) -> tuple[list[float], list[float]]:
    """Wall-clock and CPU milliseconds of each ``place`` call (explained); each placement is then
    allocated, as the controller does after its store write. ``cold`` drops the class caches
    first (a never-seen request). CPU time leaves out preemption by other processes."""
    wall, cpu = [], []
    for r in requests:
        if cold:
            engine._shapes.clear()
            engine._masks.clear()
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        try:
            d: Decision | None = engine.place(r)
        except NoCapacity:  # a refusal is a placement too
            d = None
        wall.append((time.perf_counter_ns() - t0) / 1e6)
        cpu.append((time.thread_time_ns() - c0) / 1e6)
        if d is not None:
            engine.allocate(d.host, d.resources, group=r.group)
    return wall, cpu


# -- baselines ----------------------------------------------------------------------------------
class PlainLoop:
    """The obvious placement: for each VM, a Python loop over every host applying the same
    filters and weights one host at a time."""

    def __init__(self, s: Scenario) -> None:
        self.hosts = [h.model_copy() for h in s.hosts]
        self.caps = s.capabilities
        self.types = s.instance_types
        self.load = s.load
        self.alloc = {h.name: [0.0, 0.0, 0.0, 0.0] for h in self.hosts}
        self.count = {h.name: 0 for h in self.hosts}
        self.groups: dict[str, dict[str, int]] = {}
        limits = [h.limit for h in self.hosts]
        self.top = [max(x.cpus for x in limits), max(x.memory_mib for x in limits),
                    max(x.disk_gib for x in limits)]
        w = DEFAULT_WEIGHTS
        total = sum(w[k] for k in WEIGHER_NAMES if k != "group")
        self.w = {k: w[k] / total for k in WEIGHER_NAMES}

    def place(self, r: PlacementRequest) -> str | None:
        d = [r.resources.cpus, r.resources.memory_mib, r.resources.disk_gib, r.resources.gpus]
        members = self.groups.get(r.group or "", {})
        member_domains: dict[str, int] = {}
        if r.domain is not None:
            for h in self.hosts:
                if h.name in members and r.domain in h.labels:
                    v = h.labels[r.domain]
                    member_domains[v] = member_domains.get(v, 0) + members[h.name]
        best, best_score = None, -math.inf
        for h in self.hosts:
            if h.state != HostState.UP:
                continue
            tenants = h.labels.get(TENANTS_LABEL)
            if tenants is not None and r.tenant not in tenants.split(","):
                continue
            if r.allowed_hosts is not None and h.name not in r.allowed_hosts:
                continue
            if any(h.labels.get(k) != v for k, v in r.labels.items()):
                continue
            if not r.capabilities <= self.caps[h.name]:
                continue
            types = self.types.get(h.name, ())
            fitting = [t.price_per_hour for t in types
                       if t.cpus >= d[0] and t.memory_mib >= d[1] and t.gpus >= d[3]]
            if types and not fitting:
                continue
            lim = h.limit
            limit = [lim.cpus, lim.memory_mib, lim.disk_gib, lim.gpus]
            alloc = self.alloc[h.name]
            if any(limit[j] - alloc[j] < d[j] - filters.EPSILON for j in range(4)):
                continue
            if r.group is not None:
                if r.domain is None:
                    m = members.get(h.name, 0)
                elif r.domain in h.labels:
                    m = member_domains.get(h.labels[r.domain], 0)
                else:
                    m = 0
                    if r.hard:
                        continue
                if r.hard and ((r.affinity is Affinity.ANTI_AFFINITY and m > 0)
                               or (r.affinity is Affinity.AFFINITY and members and m == 0)):
                    continue
            present = [j for j in range(4) if limit[j] > 0]
            util = {j: (alloc[j] + d[j]) / limit[j] for j in present}
            if self.count[h.name] or any(a > 0 for a in alloc):
                binpack = 0.5 + 0.5 * sum(util.values()) * (1.0 / len(present))
            else:
                binpack = 0.5 * sum(limit[j] / self.top[j] for j in range(3)) / 3
            want = [d[j] / limit[j] for j in present]
            free = [(limit[j] - alloc[j]) / limit[j] for j in present]
            dot = sum(a * b for a, b in zip(want, free, strict=True))
            norm = math.sqrt(sum(a * a for a in want)) * math.sqrt(sum(b * b for b in free))
            tetris = dot / (norm + filters.EPSILON)
            balanced = [util[j] for j in (0, 1, 3) if j in util]
            stranded = 1.0 - (max(balanced) - min(balanced))
            spread = 1.0 / (1 + self.count[h.name])
            least = 1.0 - self.load[h.name]
            price = min(fitting) if types else h.config["cost_per_hour"] * max(want)
            cost = 1.0 / (1.0 + price)
            w = self.w
            score = (w["binpack"] * binpack + w["tetris"] * tetris + w["stranded"] * stranded
                     + w["spread"] * spread + w["least_loaded"] * least + w["cost"] * cost)
            if r.group is not None and not r.hard:
                if r.affinity is Affinity.ANTI_AFFINITY:
                    g = 1.0 / (1.0 + m)
                else:
                    g = 1.0 if not members or m > 0 else 0.0
                score = (score + w["group"] * g) / (1.0 + w["group"])
            if score > best_score:
                best, best_score = h.name, score
        if best is not None:
            self.alloc[best] = [a + b for a, b in zip(self.alloc[best], d, strict=True)]
            self.count[best] += 1
            if r.group is not None:
                self.groups.setdefault(r.group, {})
                self.groups[r.group][best] = self.groups[r.group].get(best, 0) + 1
        return best


def ffd_hosts_in_use(s: Scenario) -> tuple[int, int]:
    """First-fit-decreasing with full knowledge of the batch: VMs largest first, each on the
    first host (largest hosts first) that passes the same filters. Hosts in use, refused."""
    fleet = HostFleet(s.hosts, capabilities=s.capabilities, instance_types=s.instance_types)
    mean = fleet.limit.mean(axis=1)
    host_order = np.argsort(-fleet.size, kind="stable")
    order = sorted(range(len(s.requests)), reverse=True, key=lambda k: float(
        (demand_vector(s.requests[k].resources) / mean).max()))
    refused = 0
    engine = PlacementEngine(fleet)
    for k in order:
        r = s.requests[k]
        d = demand_vector(r.resources)
        chain = static_chain(fleet, r, d) + capacity_chain(fleet.free, d)
        if r.group is not None and r.hard:
            members, labelled = engine._members(r, None)
            chain += group_chain(r, members, labelled)
        ok = np.logical_and.reduce([m for _, m in chain])
        if not ok.any():
            refused += 1
            continue
        first = host_order[int(np.argmax(ok[host_order]))]
        fleet.allocate(fleet.names[first], r.resources, group=r.group)
    return int(np.count_nonzero(fleet.vm_count)), refused


# -- report -------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def figure(value: float, target: float, op: str) -> dict[str, Any]:
    met = value >= target if op == ">=" else value <= target
    return {"value": value, "target": target, "op": op, "met": met}


def run(quick: bool) -> dict[str, Any]:
    n_hosts, n_vms = (1000, 2000) if quick else (5000, 10000)
    s = make_scenario(n_hosts, n_vms)
    engine, batch_s, in_use, refused = run_batch(s)
    rate = n_vms / batch_s
    # Single placements as the controller makes them, on the loaded fleet.
    extra = make_scenario(n_hosts, 1000, seed=SEED + 1).requests
    warm, warm_cpu = single_latencies(engine, extra)
    cold, _ = single_latencies(engine, extra[:200], cold=True)
    # Plain loop on a sample of the batch in placement order, against the engine on the same.
    loop_n = 20 if quick else 40
    order = sorted(range(n_vms), reverse=True, key=lambda k: engine._size_key(s.requests[k]))
    sample = [s.requests[k] for k in order[:loop_n]]
    loop = PlainLoop(s)
    t0 = time.perf_counter()
    loop_hosts = [loop.place(r) for r in sample]
    loop_rate = loop_n / (time.perf_counter() - t0)
    fresh = s.engine()
    agree = sum(d.host == h for d, h in zip(
        fresh.place_batch(sample, reorder=False), loop_hosts, strict=True)
        if hasattr(d, "host"))
    ffd_in_use, ffd_refused = ffd_hosts_in_use(s)
    scaling = []
    for size in ((500, 5000, 20000) if not quick else (500, 2000)):
        sc = make_scenario(size, 2 * size, seed=SEED + 2)
        e, secs, _, _ = run_batch(sc)
        lat, _ = single_latencies(e, sc.requests[:300])
        cold_lat, _ = single_latencies(e, sc.requests[300:400], cold=True)
        scaling.append({"hosts": size, "vms": 2 * size, "placements_per_s": 2 * size / secs,
                        "us_per_placement": secs / (2 * size) * 1e6,
                        "single_p50_ms": percentile(lat, 50), "single_p99_ms": percentile(lat, 99),
                        "cold_p50_ms": percentile(cold_lat, 50)})
    figures = {
        "placements_per_s": figure(rate, TARGETS["placements_per_s"], ">="),
        "p99_ms": figure(percentile(warm, 99), TARGETS["p99_ms"], "<="),
        "speedup_vs_loop": figure(rate / loop_rate, TARGETS["speedup_vs_loop"], ">="),
        "hosts_vs_ffd": figure(in_use / ffd_in_use, TARGETS["hosts_vs_ffd"], "<="),
    }
    return {
        "hosts": n_hosts, "vms": n_vms, "seed": SEED, "targets": figures,
        "all_met": all(f["met"] for f in figures.values()),
        "novacron": {"batch_s": batch_s, "placements_per_s": rate, "hosts_in_use": in_use,
                     "refused": refused, "single_p50_ms": percentile(warm, 50),
                     "single_p99_ms": percentile(warm, 99),
                     "single_cpu_p99_ms": percentile(warm_cpu, 99),
                     "cold_p50_ms": percentile(cold, 50), "cold_p99_ms": percentile(cold, 99)},
        "plain_loop": {"sample": loop_n, "placements_per_s": loop_rate,
                       "same_host_as_engine": agree,
                       "cold_place_speedup": 1000.0 / percentile(cold, 50) / loop_rate},
        "ffd": {"hosts_in_use": ffd_in_use, "refused": ffd_refused},
        "scaling": scaling,
    }


def ray_sharded(n_hosts: int, parts: int = 2, placements: int = 30) -> dict[str, Any]:
    """Single placements through :class:`ShardedScorer` against cold in-process ones."""
    import ray

    from actors.scoring_tasks import ShardedScorer

    s = make_scenario(n_hosts, 2 * n_hosts, seed=SEED + 3)
    engine = s.engine()
    engine.place_batch(s.requests[:n_hosts])
    sample = s.requests[n_hosts:n_hosts + placements]
    ray.init(address="local", num_cpus=parts, include_dashboard=False, log_to_driver=False)
    try:
        scorer = ShardedScorer(engine, parts)
        scorer.place(sample[0])  # ship the slices once
        sharded, local, same = [], [], 0
        for r in sample:
            t0 = time.perf_counter()
            a = scorer.place(r)
            sharded.append((time.perf_counter() - t0) * 1e3)
            engine._shapes.clear()
            t0 = time.perf_counter()
            b = engine.place(r, explain=False)
            local.append((time.perf_counter() - t0) * 1e3)
            same += a.host == b.host
            engine.allocate(a.host, a.resources, group=r.group)
    finally:
        ray.shutdown()
    return {"hosts": n_hosts, "parts": parts, "placements": placements, "same_host": same,
            "sharded_p50_ms": percentile(sharded, 50), "local_cold_p50_ms": percentile(local, 50)}


def table(r: dict[str, Any]) -> str:
    n, loop, ffd = r["novacron"], r["plain_loop"], r["ffd"]
    sharded = r.get("ray")
    lines = [
        f"placement: {r['hosts']} hosts, {r['vms']} VMs, seed {r['seed']}, every filter and "
        "weigher on",
        "",
        f"{'':34}{'NovaCron':>12}{'plain loop':>12}{'FFD':>10}",
        f"{'placements/s':34}{n['placements_per_s']:>12,.0f}{loop['placements_per_s']:>12,.1f}"
        f"{'-':>10}",
        f"{'place() p50 / p99 (ms)':34}{n['single_p50_ms']:>12.3f} / {n['single_p99_ms']:.3f}",
        f"{'place() CPU time p99 (ms)':34}{n['single_cpu_p99_ms']:>12.3f}",
        f"{'cold place() p50 / p99 (ms)':34}{n['cold_p50_ms']:>12.3f} / {n['cold_p99_ms']:.3f}",
        f"{'hosts in use':34}{n['hosts_in_use']:>12}{'-':>12}{ffd['hosts_in_use']:>10}",
        f"{'refused':34}{n['refused']:>12}{'-':>12}{ffd['refused']:>10}",
        f"plain loop sample: {loop['sample']} VMs, same host as NovaCron for "
        f"{loop['same_host_as_engine']}; a cold place() is "
        f"{loop['cold_place_speedup']:.0f}x the loop",
        "",
        f"{'hosts':>8}{'VMs':>8}{'placements/s':>14}{'us/placement':>14}{'place() p50':>13}"
        f"{'p99 (ms)':>10}{'cold p50':>10}",
    ]
    for row in r["scaling"]:
        lines.append(f"{row['hosts']:>8}{row['vms']:>8}{row['placements_per_s']:>14,.0f}"
                     f"{row['us_per_placement']:>14.1f}{row['single_p50_ms']:>13.3f}"
                     f"{row['single_p99_ms']:>10.3f}{row['cold_p50_ms']:>10.3f}")
    if sharded:
        lines += ["", f"Ray slices ({sharded['hosts']} hosts, {sharded['parts']} tasks): place() "
                  f"p50 {sharded['sharded_p50_ms']:.2f} ms vs {sharded['local_cold_p50_ms']:.2f} "
                  f"ms cold in-process; same host {sharded['same_host']}/{sharded['placements']}"]
    lines += ["", f"{'target':20}{'value':>12}{'goal':>12}  met"]
    for name, f in r["targets"].items():
        lines.append(f"{name:20}{f['value']:>12.3f}{f['op']:>4}{f['target']:>8}  "
                     f"{'yes' if f['met'] else 'NO'}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a smaller run (smoke test)")
    parser.add_argument("--ray", action="store_true",
                        help="also time scoring split across Ray tasks (starts a local Ray)")
    args = parser.parse_args(argv)
    result = run(args.quick)
    if args.ray:
        result["ray"] = ray_sharded(2000 if args.quick else 20000)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if result["all_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
