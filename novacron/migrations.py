"""Migration rules without Ray or a store: limits, timeouts, progress, what a driver can do.

The control plane (``novacron.controlplane``) applies them to records and the MigrationActor
(``actors/migration/``) to the passes it runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from novacron.errors import NotSupported
from novacron.migration.costmodel import Prediction, Workload, predict
from novacron.migration.precopy import PrecopyPolicy
from novacron.model import VM, Migration, MigrationPolicy, MigrationProgress
from novacron.states import MIGRATION_DONE, MigrationPhase

MAX_ACTIVE = 5  # migrations running at once in the cluster (more are queued)
MAX_OUTBOUND = 2  # migrations running at once out of one host
TIMEOUT_S_PER_GIB = 150.0  # completion timeout per GiB to move
NO_PROGRESS_TIMEOUT_S = 150.0  # a migration that moves nothing for this long fails
DEFAULT_LINK_MIB_S = 1024.0  # assumed link speed for a prediction without a bandwidth cap
_MIB = 1024**2
_GIB = 1024**3


@dataclass(frozen=True)
class Path:
    """How a migration between two kinds of host runs: the run that implements it
    (``actors/migration/<name>.py``), the modes it can do, the policy options it honours and
    the pairs of them it cannot combine."""

    name: str
    modes: frozenset[str]
    options: frozenset[str] = frozenset()
    conflicts: frozenset[frozenset[str]] = frozenset()
    why: str = ""  # why the other modes are not possible, where it is not obvious


# (source driver, target driver) -> the path a migration between them takes
PATHS: dict[tuple[str, str], Path] = {
    ("sim", "sim"): Path("sim", frozenset({"cold", "warm", "live"}),
                         options=frozenset({"compress", "xbzrle"})),
    ("sim", "aws"): Path("cloud_import", frozenset({"cold"}), why=(
        "the stopped guest's disk is imported as an AMI; a running guest's memory cannot be "
        "moved into an EC2 instance")),
    # libvirt's own migration; QEMU's multifd (parallel) takes neither compression nor post-copy
    ("libvirt", "libvirt"): Path(
        "libvirt", frozenset({"live"}),
        options=frozenset({"post_copy", "compress", "xbzrle", "parallel"}),
        conflicts=frozenset({frozenset({"parallel", "compress"}),
                             frozenset({"parallel", "xbzrle"}),
                             frozenset({"parallel", "post_copy"})}),
        why="libvirt moves running guests; cold migration between libvirt hosts is not "
            "implemented yet, and libvirt has no warm migration"),
}
# off by default; a path must honour them
POLICY_OPTIONS = ("post_copy", "compress", "xbzrle", "parallel")

# Why a path lacks a policy option, where it is not obvious: (path name, option) -> reason.
OPTION_WHY: dict[tuple[str, str], str] = {
    ("sim", "post_copy"): (
        "a sim guest maps its memory file directly and has no page-fault path, so once started "
        "on the target before every page arrived it would read, and partly rewrite, pages that "
        "are still zero there, and a page it wrote could then be overwritten by the stale copy "
        "on its way; use auto_converge, or force-complete, which pauses the guest to finish"),
}

# Why no path leads out of / into a kind of host, where its driver is the reason.
NO_PATH_OUT: dict[str, str] = {
    cloud: f"the {cloud} driver exports no disks" for cloud in ("aws", "azure", "gcp")}
NO_PATH_IN: dict[str, str] = {
    "azure": "the azure driver imports no disk images into Azure (it lacks image_import)",
    "gcp": "the gcp driver imports no disk images into Compute Engine (it lacks image_import)",
}


def path_for(source_driver: str, target_driver: str, mode: str) -> str:
    """The name of the path a ``mode`` migration from a ``source_driver`` host to a
    ``target_driver`` host takes; NotSupported, saying what is possible, if there is none."""
    path = PATHS.get((source_driver, target_driver))
    if path is None:
        pairs = ", ".join(f"{a} -> {b}" for a, b in PATHS)
        why = NO_PATH_OUT.get(source_driver) or NO_PATH_IN.get(target_driver)
        raise NotSupported(f"NovaCron cannot migrate from a {source_driver} host to a "
                           f"{target_driver} host{f': {why}' if why else ''} (it can: {pairs})",
                           details={"source_driver": source_driver,
                                    "target_driver": target_driver})
    if mode not in path.modes:
        raise NotSupported(f"{mode} migration from a {source_driver} host to a {target_driver} "
                           f"host is not possible; use {' or '.join(sorted(path.modes))}"
                           f"{f' ({path.why})' if path.why else ''}",
                           details={"source_driver": source_driver,
                                    "target_driver": target_driver, "mode": mode})
    return path.name


def check_supported(mode: str, policy: MigrationPolicy, source_driver: str,
                    target_driver: str) -> None:
    """NotSupported, saying why, for a mode or policy option NovaCron cannot run between
    these two kinds of host."""
    path_for(source_driver, target_driver, mode)
    path = PATHS[(source_driver, target_driver)]
    unsupported = [k for k in POLICY_OPTIONS if getattr(policy, k) and k not in path.options]
    if unsupported:
        why = "".join(f"; {k}: {OPTION_WHY[path.name, k]}" for k in unsupported
                      if (path.name, k) in OPTION_WHY)
        raise NotSupported(f"policy option(s) {', '.join(unsupported)} are not available for "
                           f"{mode} migration from a {source_driver} host to a {target_driver} "
                           f"host{why}", details={"options": unsupported})
    for pair in sorted(sorted(c) for c in path.conflicts):
        if all(getattr(policy, k) for k in pair):
            raise NotSupported(f"policy options {' and '.join(pair)} cannot be combined for "
                               f"{mode} migration from a {source_driver} host to a "
                               f"{target_driver} host", details={"options": pair})


def can_admit(migration: Migration, others: Iterable[Migration]) -> bool:
    """Whether a pending migration may start now: the cluster runs fewer than ``MAX_ACTIVE``
    and its source fewer than ``MAX_OUTBOUND``; older pending ones go first."""
    active = [m for m in others if m.id != migration.id and m.phase not in MIGRATION_DONE]
    running = [m for m in active if m.phase != MigrationPhase.PENDING]
    ahead = [m for m in active if m.phase == MigrationPhase.PENDING and m.id < migration.id]
    cluster = len(running) + len(ahead)
    outbound = sum(1 for m in running + ahead if m.source == migration.source)
    return cluster < MAX_ACTIVE and outbound < MAX_OUTBOUND


def completion_timeout_s(vm: VM) -> float:
    """How long a migration of ``vm`` may take: ``TIMEOUT_S_PER_GIB`` per GiB of RAM and disk,
    at least one GiB's worth."""
    gib = vm.spec.memory_mib / 1024 + vm.spec.disk_gib
    return TIMEOUT_S_PER_GIB * max(1.0, gib)


def precopy_policy(policy: MigrationPolicy) -> PrecopyPolicy:
    """The pre-copy planner's policy for a migration policy."""
    return PrecopyPolicy(downtime_limit_s=policy.max_downtime_ms / 1000,
                         auto_converge=policy.auto_converge, post_copy=policy.post_copy)


def prediction(vm: VM, mode: str, policy: MigrationPolicy, *,
               disk_bytes: int | None = None) -> Prediction:
    """The cost model's prediction for moving ``vm`` (the whole disk unless ``disk_bytes``)."""
    link = (policy.bandwidth_mib_s or DEFAULT_LINK_MIB_S) * _MIB
    work = vm.spec.workload
    workload = Workload(
        bandwidth=link,
        disk_bytes=vm.spec.disk_gib * _GIB if disk_bytes is None else disk_bytes,
        memory_bytes=vm.spec.memory_mib * _MIB if mode == "live" else 0,
        memory_dirty_rate=work.dirty_rate_mib_s * _MIB,
        disk_dirty_rate=work.disk_write_mib_s * _MIB,
        device_state_bytes=4096,
    )
    return predict(mode, workload, precopy_policy(policy))  # type: ignore[arg-type]


def advance(old: MigrationProgress, new: MigrationProgress) -> MigrationProgress:
    """``new`` with its percent held at or above ``old``'s (progress never goes back)."""
    return new.model_copy(update={"percent": round(max(old.percent, min(new.percent, 100.0)), 1)})
