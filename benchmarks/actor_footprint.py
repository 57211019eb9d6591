"""VMActor footprint: memory (PSS) per VMActor and actors started per second, for 100 VMs,
against the same number of empty Ray actors started in the same run.

VMs are created through the controller (not started, so no guest processes run); the VMActors are
the ones NovaCron's fleet creates for them.

    python benchmarks/actor_footprint.py [--vms 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

TARGET_PSS_MB = 60.0


class Empty:
    """The baseline: a Ray actor that does nothing."""

    def pid(self) -> int:
        import os

        return os.getpid()


def pss_mb(pids: list[int]) -> list[float]:
    return [psutil.Process(pid).memory_full_info().pss / 2**20 for pid in pids]


def wait_pids(actors: list[Any], timeout: float = 600) -> list[int]:
    import ray

    pids: list[int] = ray.get([a.pid.remote() for a in actors], timeout=timeout)
    return pids


def run(count: int) -> dict[str, Any]:
    import ray

    from actors.runtime import start_control_plane, stop_control_plane
    from novacron.config import Settings
    from novacron.model import HostCreate, Resources, VMCreate

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    try:
        empty_cls: Any = ray.remote(Empty)
        start = time.perf_counter()
        empties = [empty_cls.options(num_cpus=0).remote() for _ in range(count)]
        empty_pids = wait_pids(empties)
        empty_seconds = time.perf_counter() - start
        empty_pss = pss_mb(empty_pids)
        for actor in empties:
            ray.kill(actor)

        state = Path(tempfile.mkdtemp(prefix="nc-bench-actors-"))
        settings = Settings(state_dir=state, namespace="nc-bench-actors", sim_hosts=0)
        controller = start_control_plane(settings)
        capacity = Resources(cpus=4096, memory_mib=4 << 20, disk_gib=100_000)
        ray.get(controller.register_host.remote(HostCreate(
            name="big", driver="sim", capacity=capacity,
            config={"capacity": capacity.model_dump(), "memory_dir": str(state / "shm")})))
        start = time.perf_counter()
        vms = [ray.get(controller.create_vm.remote(VMCreate(
            name=f"fp-{i:03d}", cpus=1, memory_mib=64, start=False))) for i in range(count)]
        handles = []
        for vm in vms:
            while True:
                try:
                    handles.append(ray.get_actor(f"vm:{vm.id}", namespace=settings.namespace))
                    break
                except ValueError:
                    time.sleep(0.05)
        vm_pids = wait_pids(handles)
        vm_seconds = time.perf_counter() - start
        vm_pss = pss_mb(vm_pids)
        stop_control_plane(settings.namespace, stop_guests=True)
    finally:
        ray.shutdown()
    vm_median = statistics.median(vm_pss)
    return {
        "actors": count,
        "empty_actor": {"pss_mb_median": statistics.median(empty_pss),
                        "pss_mb_max": max(empty_pss),
                        "started_per_s": count / empty_seconds},
        "vm_actor": {"pss_mb_median": vm_median, "pss_mb_max": max(vm_pss),
                     "started_per_s": count / vm_seconds},
        "ratio_pss_to_empty": vm_median / statistics.median(empty_pss),
        "ratio_rate_to_empty": (count / vm_seconds) / (count / empty_seconds),
        "targets": {"vm_actor_pss_mb": {"target": TARGET_PSS_MB, "value": vm_median,
                                        "met": vm_median <= TARGET_PSS_MB}},
    }


def print_table(r: dict[str, Any]) -> None:
    print(f"Footprint of {r['actors']} actors (PSS: proportional set size)")
    print(f"{'actor':<22}{'PSS median MB':>15}{'PSS max MB':>12}{'started/s':>12}")
    for key, label in (("empty_actor", "empty Ray actor"), ("vm_actor", "NovaCron VMActor")):
        f = r[key]
        print(f"{label:<22}{f['pss_mb_median']:>15.1f}{f['pss_mb_max']:>12.1f}"
              f"{f['started_per_s']:>12.1f}")
    print(f"VMActor / empty actor: PSS {r['ratio_pss_to_empty']:.2f}x, "
          f"start rate {r['ratio_rate_to_empty']:.2f}x")
    t = r["targets"]["vm_actor_pss_mb"]
    print(f"target PSS per VMActor <= {t['target']} MB: {t['value']:.1f} MB "
          f"{'met' if t['met'] else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = run(args.vms)
    print(json.dumps(result, indent=2) if args.json else "", end="")
    if not args.json:
        print_table(result)


if __name__ == "__main__":
    main()
