"""Live migration of sim guests: downtime, total time, bytes sent / RAM and passes, in one run.

Guests of 1 GiB that have touched all of their RAM dirty 0, 50 and 200 MiB/s of it (and write
their disk at ``--disk-write`` MiB/s) while they move back and forth between two sim hosts over a
link capped at 1 GiB/s and at 100 MiB/s (the policy's ``bandwidth_mib_s`` token bucket), without
and with compression and XBZRLE page deltas (policy ``compress`` + ``xbzrle``; ``--all-variants``
also runs each alone; combinations the engine refuses are listed with its reason). Where the dirty
rate is at least half the link, auto-converge is on. The downtime limit is the target, 50 ms.
Every migration goes through ``novacron.connect()`` on a private control plane. Beside each: the
cost model's prediction for the same guest, the planner's expected downtime, QEMU's default
downtime limit (300 ms) and, for the bytes, pre-copy's geometric bound RAM / (1 - dirty / link).

Targets: downtime <= 50 ms at 50 MiB/s on the 1 GiB/s link (the median of ``--repeat`` runs);
memory bytes sent <= 1.1x RAM and convergence without throttling while the dirty rate is below
half the link; convergence with auto-converge at 200 MiB/s on the 100 MiB/s link. The downtime
runs from the pause on the source to the guest running on the target.

    python benchmarks/live_migration.py [--quick] [--all-variants] [--repeat 3] [--json]

The whole run takes about five minutes on two cores, most of it on the 100 MiB/s link; ``--quick``
moves 256 MiB guests without compression, each case once (about a minute). A shared machine only
ever adds time: the 1-minute load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray

from actors.runtime import start_control_plane, stop_control_plane
from novacron.client import NovaCron, VMHandle, connect
from novacron.config import Settings
from novacron.drivers.sim import SimDriver
from novacron.drivers.simguest import CONTROL_SIZE, GENERATION_SIZE, PAGE_SIZE
from novacron.errors import NovaCronError
from novacron.migration.costmodel import Workload, predict
from novacron.migrations import precopy_policy
from novacron.model import HostCreate, MigrationPolicy
from novacron.model import Workload as GuestWorkload
from novacron.states import MigrationPhase

MIB = 1024**2
DIRTY_RATES = (0.0, 50.0, 200.0)  # MiB/s of memory writes
LINKS = (1024.0, 100.0)  # MiB/s, the bandwidth cap
VARIANTS: dict[str, dict[str, bool]] = {
    "plain": {}, "compress": {"compress": True}, "xbzrle": {"xbzrle": True},
    "compress+xbzrle": {"compress": True, "xbzrle": True}}
DEFAULT_VARIANTS = ("plain", "compress+xbzrle")
HEADLINE = (50.0, 1024.0, "plain")  # the downtime target's case
DOWNTIME_TARGET_MS = 50.0
QEMU_DEFAULT_DOWNTIME_MS = 300.0
BYTES_TARGET = 1.1  # memory bytes sent / guest RAM
SETTLE_S = 1.0  # a moved guest runs this long before it moves again


@dataclass(frozen=True)
class Case:
    dirty: float
    link: float
    variant: str

    @property
    def label(self) -> str:
        link = f"{self.link / 1024:g} GiB/s" if self.link >= 1024 else f"{self.link:g} MiB/s"
        return f"{self.dirty:g} MiB/s dirty, {link}, {self.variant}"

    @property
    def auto_converge(self) -> bool:
        return self.dirty >= self.link / 2

    @property
    def precopy_bound(self) -> float:
        """Bytes / RAM of ideal pre-copy (every byte dirtied is distinct): 1 / (1 - d / b)."""
        return 1 / (1 - self.dirty / self.link) if self.dirty < self.link else float("inf")


def kill_guests_under(path: Path) -> None:
    """Kill the sim guests whose command line names ``path`` (this benchmark's own)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or ())
            if "simguest" in cmdline and str(path) in cmdline:
                os.kill(proc.pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue


class Bench:
    """A private control plane with two sim hosts, and the guests that move between them."""

    def __init__(self, workdir: Path, memory_dir: Path, memory_mib: int,
                 disk_write: float) -> None:
        self.settings = Settings(state_dir=workdir, namespace=f"nc-bench-live-{os.getpid()}",
                                 sim_hosts=0)
        self.memory_mib = memory_mib
        self.disk_write = disk_write
        self.host_config = {"capacity": {"cpus": 8, "memory_mib": 4 * memory_mib + 1024,
                                         "disk_gib": 16},
                            "memory_dir": str(memory_dir)}
        start_control_plane(self.settings)
        self.nc: NovaCron = connect(namespace=self.settings.namespace, state_dir=workdir)
        for host in ("h1", "h2"):
            self.nc.call("register_host", HostCreate(name=host, driver="sim",
                                                     config=self.host_config))

    def driver(self, host: str) -> SimDriver:
        return SimDriver(host, None, self.host_config, self.settings.state_dir)

    def guest(self, dirty: float) -> VMHandle:
        """A running guest that has touched all of its RAM (``populate_fraction`` 1.0, set
        through the sim driver, then a reboot), dirtying ``dirty`` MiB/s."""
        vm = self.nc.vms.create(f"g{dirty:g}", cpus=1, memory_mib=self.memory_mib, disk_gib=1,
                                host="h1", workload=GuestWorkload(
                                    dirty_rate_mib_s=dirty, disk_write_mib_s=self.disk_write))
        vm.wait_for("running", timeout=120)
        driver = self.driver("h1")
        boots = driver.read_status(vm.id).boot_count
        driver.set_workload(vm.id, populate_fraction=1.0)
        vm.reboot()
        pages = self.memory_mib * MIB // PAGE_SIZE
        deadline = time.monotonic() + 300
        while True:
            status = driver.read_status(vm.id)
            if status.boot_count > boots and status.touched_pages >= pages:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest {vm.id} did not populate its memory")
            time.sleep(0.2)
        return vm.wait_for("running", timeout=60)

    def migrate(self, vm: VMHandle, case: Case) -> dict[str, Any]:
        """Move ``vm`` to the other host under ``case``: its figures, or why it was refused."""
        source = vm.refresh().record.host or "h1"
        policy = MigrationPolicy(bandwidth_mib_s=case.link, max_downtime_ms=int(
            DOWNTIME_TARGET_MS), auto_converge=case.auto_converge, **VARIANTS[case.variant])
        driver = self.driver(source)
        status = driver.read_status(vm.id)
        pages = self.memory_mib * MIB // PAGE_SIZE
        model = predict("live", Workload(
            bandwidth=case.link * MIB,
            disk_bytes=os.stat(driver.memory_paths(vm.id).disk).st_blocks * 512,
            memory_bytes=status.touched_pages * PAGE_SIZE, memory_dirty_rate=case.dirty * MIB,
            disk_dirty_rate=self.disk_write * MIB,
            device_state_bytes=pages * GENERATION_SIZE + CONTROL_SIZE), precopy_policy(policy))
        row: dict[str, Any] = {"case": asdict(case)}
        try:
            mig = self.nc.migrations.start(vm.id, to="h2" if source == "h1" else "h1",
                                           mode="live", policy=policy)
        except NovaCronError as exc:
            return {**row, "refused": exc.message}
        record = mig.wait(timeout=900, poll_s=0.1).record
        row.update(phase=record.phase.value, reason=record.reason, prediction=model.to_dict(),
                   iterations=record.progress.iteration,
                   rate_mib_s=record.progress.rate / MIB)  # of the last pass
        if record.phase == MigrationPhase.COMPLETED:
            out = record.outcome
            row.update(downtime_ms=out["downtime_ms"], total_s=out["total_s"],
                       bytes=out["bytes"], memory_bytes_sent=out["memory_bytes_sent"],
                       bytes_per_ram=out["memory_bytes_sent"] / (self.memory_mib * MIB),
                       throttle_pct=record.progress.throttle_pct,
                       **{k: out.get(k) for k in ("expected_downtime_ms", "stop_and_copy_ms",
                                                  "handover_ms", "final_pages",
                                                  "final_disk_blocks", "disk_bytes_sent")})
            vm.wait_for("running", timeout=60)
            time.sleep(SETTLE_S)
        return row

    def close(self) -> None:
        stop_control_plane(self.settings.namespace, stop_guests=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    memory_mib = 256 if args.quick else args.memory_mib
    variants = (("plain",) if args.quick else tuple(VARIANTS) if args.all_variants
                else DEFAULT_VARIANTS)
    repeat = 1 if args.quick else args.repeat
    workdir = Path(tempfile.mkdtemp(prefix="nc-bench-live-"))
    shm = Path("/dev/shm")  # guest memory in shared memory, as with the embedded default
    memory_dir = Path(tempfile.mkdtemp(prefix="nc-bench-live-", dir=shm if os.access(
        shm, os.W_OK) else None))
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             logging_level=logging.ERROR, log_to_driver=False)
    try:
        bench = Bench(workdir, memory_dir, memory_mib, args.disk_write)
        try:
            for dirty in DIRTY_RATES:
                vm = bench.guest(dirty)
                for link in LINKS:
                    for variant in variants:
                        case = Case(dirty, link, variant)
                        runs = repeat if (dirty, link, variant) == HEADLINE else 1
                        for _ in range(runs):
                            rows.append(bench.migrate(vm, case))
                            if not args.json:
                                print_row(rows[-1])
                vm.delete()
        finally:
            bench.close()
    finally:
        ray.shutdown()
        kill_guests_under(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(memory_dir, ignore_errors=True)
    return {"benchmark": "live_migration", "memory_mib": memory_mib,
            "disk_write_mib_s": args.disk_write, "max_downtime_ms": DOWNTIME_TARGET_MS,
            "runs": rows, "targets": targets(rows), "elapsed_s": time.monotonic() - started,
            "load_average_1m": {"before": load_before, "after": os.getloadavg()[0]}}


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with its value, the ratio to it and whether it was met."""
    found: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: float, met: bool,
            reference: str = "") -> None:
        found.append({"name": name, "value": value, "target": target, "met": met,
                      "ratio": None if value is None or not target else value / target,
                      "reference": reference})

    headline = [r["downtime_ms"] for r in rows
                if tuple(r["case"].values()) == HEADLINE and "downtime_ms" in r]
    median = statistics.median(headline) if headline else None
    add(f"downtime ms, {Case(*HEADLINE).label} (median of {len(headline)})", median,
        DOWNTIME_TARGET_MS, median is not None and median <= DOWNTIME_TARGET_MS,
        f"runs {', '.join(f'{d:.1f}' for d in headline)}; QEMU's default limit "
        f"{QEMU_DEFAULT_DOWNTIME_MS:g} ms: "
        f"{'-' if median is None else f'{median / QEMU_DEFAULT_DOWNTIME_MS:.2f}x'}")
    for row in rows:
        case = Case(**row["case"])
        if "refused" in row or case.auto_converge:
            continue
        done = row["phase"] == MigrationPhase.COMPLETED.value
        add(f"converged unthrottled, {case.label}", row.get("throttle_pct"), 0,
            done and row.get("throttle_pct") == 0, "" if done else str(row["reason"]))
        if done:
            ratio = row["bytes_per_ram"]
            add(f"memory bytes / RAM, {case.label}", ratio, BYTES_TARGET, ratio <= BYTES_TARGET,
                f"ideal pre-copy without compression {case.precopy_bound:.2f}x")
    for row in rows:
        if tuple(row["case"].values())[:2] == (200.0, 100.0) and "refused" not in row:
            done = row["phase"] == MigrationPhase.COMPLETED.value
            add(f"converged with auto-converge, {Case(**row['case']).label} (throttle %)",
                row.get("throttle_pct"), 99, done, "" if done else str(row["reason"]))
    return found


def print_row(row: dict[str, Any]) -> None:
    label = Case(**row["case"]).label
    if "refused" in row:
        print(f"  {label:<44} refused: {row['refused']}", flush=True)
        return
    if row["phase"] != MigrationPhase.COMPLETED.value:
        print(f"  {label:<44} {row['phase']} after {row['iterations']} passes (the last at "
              f"{row['rate_mib_s']:.0f} MiB/s): {row['reason']}", flush=True)
        return
    p = row["prediction"]
    print(f"  {label:<44} downtime {row['downtime_ms']:6.1f} ms (planner "
          f"{row['expected_downtime_ms']:5.1f}, model {p['downtime_s'] * 1000:5.1f}; "
          f"{row['downtime_ms'] / QEMU_DEFAULT_DOWNTIME_MS:.2f}x QEMU's 300 ms)  "
          f"total {row['total_s']:6.2f} s (model {p['duration_s']:6.2f})  "
          f"memory {row['bytes_per_ram']:4.2f}x RAM  passes {row['iterations']:2d} "
          f"(model {p['passes']:2d}, last at {row['rate_mib_s']:4.0f} MiB/s)  "
          f"throttle {row['throttle_pct']:2d} %  "
          f"[pause to copied {row['stop_and_copy_ms']:.1f} ms: {row['final_pages']} pages, "
          f"{row['final_disk_blocks']} disk blocks; handover {row['handover_ms']:.1f} ms]",
          flush=True)


def print_report(result: dict[str, Any]) -> None:
    print("targets:")
    for t in result["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        ratio = "" if t["ratio"] is None else f" (ratio {t['ratio']:.2f})"
        note = f"; {t['reference']}" if t["reference"] else ""
        print(f"  {'PASS' if t['met'] else 'MISS'}  {t['name']}: {value} vs "
              f"{t['target']:g}{ratio}{note}")
    load = result["load_average_1m"]
    print(f"{len(result['runs'])} migrations in {result['elapsed_s']:.0f} s; 1-min load "
          f"average {load['before']:.2f} before, {load['after']:.2f} after (2 cores)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="256 MiB guests, no compression, each case once")
    parser.add_argument("--memory-mib", type=int, default=1024, help="guest RAM")
    parser.add_argument("--disk-write", type=float, default=8.0,
                        help="MiB/s each guest writes to its disk")
    parser.add_argument("--all-variants", action="store_true",
                        help="also compress alone and xbzrle alone")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the downtime target's case")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.json:
        print(f"live migration: {256 if args.quick else args.memory_mib} MiB guests, disk "
              f"writes {args.disk_write:g} MiB/s, downtime limit {DOWNTIME_TARGET_MS:g} ms",
              flush=True)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result)
    return 0 if all(t["met"] for t in result["targets"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
