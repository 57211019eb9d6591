"""The rebalancer at work: proposals (:mod:`novacron.placement.rebalance`) turned into migrations.

:meth:`Rebalancer.run` looks at the fleet as it is, with every migration in flight counted on its
target already, and proposes moves for the VMs that may move: running ones where a live migration
path exists (no downtime: a running VM is never moved cold to balance load), stopped ones cold;
never one that is migrating, changing state, on a host that is not up, or labelled
``novacron.io/rebalance=false``. Only hosts whose driver can migrate to its own kind take part.
Moves stay within the free migration slots (``MAX_ACTIVE`` in the cluster, ``MAX_OUTBOUND`` per
source). With ``dry_run`` nothing moves; otherwise each move starts a migration, or says why it
could not. :meth:`Rebalancer.tick` runs it every ``interval_s`` when enabled, and only while no
migration is in flight (the last round's moves have landed).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from novacron import migrations as rules
from novacron.config import Settings
from novacron.controlplane import ControlPlane, placement_request, unsettled
from novacron.errors import NovaCronError
from novacron.evacuation import can_migrate
from novacron.model import VM, Host, MigrationCreate
from novacron.placement import PlacementEngine, VMPlacementInfo
from novacron.placement.rebalance import Movable, RebalanceConfig, propose
from novacron.states import MIGRATION_DONE, HostState, PowerState, VMState

log = logging.getLogger("novacron.rebalancing")

OPT_OUT_LABEL = "novacron.io/rebalance"  # a VM labelled "false" is never moved to rebalance


@dataclass(frozen=True)
class RebalanceSettings:
    """Whether the rebalancer runs by itself, how often, and its thresholds."""

    enabled: bool = False
    interval_s: float = 300.0
    config: RebalanceConfig = field(default_factory=RebalanceConfig)

    @classmethod
    def from_settings(cls, settings: Settings) -> RebalanceSettings:
        return cls(enabled=settings.rebalance_enabled, interval_s=settings.rebalance_interval_s,
                   config=RebalanceConfig(threshold=settings.rebalance_threshold,
                                          tolerance=settings.rebalance_tolerance,
                                          max_moves=settings.rebalance_max_moves,
                                          min_gain=settings.rebalance_min_gain))


class Rebalancer:
    """Proposes and starts rebalancing migrations. Thread-safe; one per control plane."""

    def __init__(self, plane: ControlPlane, settings: RebalanceSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.plane = plane
        self.settings = settings or RebalanceSettings()
        self.clock = clock
        self._lock = threading.Lock()
        self._next = clock() + self.settings.interval_s

    def run(self, *, dry_run: bool = True) -> dict[str, Any]:
        """One round: the proposed moves with their reasons and, without ``dry_run``, the
        migration each started (or the error that refused it)."""
        with self._lock:
            hosts = self.plane.list_hosts()
            vms = self.plane.list_vms()
            active = [m for m in self.plane.list_migrations() if m.phase not in MIGRATION_DONE]
            engine = self._engine(hosts, vms, {m.vm: m.target for m in active})
            paths: dict[tuple[str, str, str], bool] = {}

            def path(mode: str, source: str, target: str) -> bool:
                key = (mode, source, target)
                if key not in paths:
                    paths[key] = can_migrate(mode, source, target)
                return paths[key]

            by_name: dict[str, Host] = {h.name: h for h in hosts}
            movable = [m for vm in vms if (m := self._movable(vm, by_name, hosts, path))]
            scope = [h.name for h in hosts if h.state == HostState.UP
                     and (path("live", h.driver, h.driver) or path("cold", h.driver, h.driver))]
            slots = max(0, rules.MAX_ACTIVE - len(active))
            outbound: dict[str, int] = {
                h.name: max(0, rules.MAX_OUTBOUND - sum(m.source == h.name for m in active))
                for h in hosts}
            proposal = propose(engine, movable, self.settings.config, slots=slots,
                               source_slots=outbound, hosts=scope)
            notes = list(proposal.notes)
            if slots == 0:
                notes.insert(0, f"no migration slot free: {len(active)} migration(s) in flight "
                                f"(limit {rules.MAX_ACTIVE})")
            items = []
            for move in proposal.moves:
                item: dict[str, Any] = {**move.to_dict(), "migration": None, "error": None}
                if not dry_run:
                    try:
                        migration = self.plane.create_migration(
                            move.vm_id, MigrationCreate.model_validate(
                                {"vm": move.vm_id, "target_host": move.target,
                                 "mode": move.mode}))
                    except NovaCronError as exc:
                        item["error"] = exc.to_dict()
                        log.warning("rebalance: could not move %s to %s: %s", move.name,
                                    move.target, exc.message)
                    else:
                        item["migration"] = migration.id
                        log.info("rebalance: %s %s -> %s (%s): %s", move.name, move.source,
                                 move.target, migration.id, move.reason)
                items.append(item)
            return {"dry_run": dry_run, "enabled": self.settings.enabled,
                    "before": proposal.before.to_dict(), "after": proposal.after.to_dict(),
                    "items": items, "notes": notes}

    def tick(self) -> dict[str, Any] | None:
        """Run a round if enabled, its interval has passed and no migration is in flight."""
        if not self.settings.enabled or self.clock() < self._next:
            return None
        if any(m.phase not in MIGRATION_DONE for m in self.plane.list_migrations()):
            return None  # let the last moves land first; try again next pass
        self._next = self.clock() + self.settings.interval_s
        result = self.run(dry_run=False)
        if result["items"]:
            log.info("rebalance round: %d move(s), score %.4g -> %.4g", len(result["items"]),
                     result["before"]["score"], result["after"]["score"])
        return result

    @staticmethod
    def _engine(hosts: list[Host], vms: list[VM], targets: dict[str, str]) -> PlacementEngine:
        """A placement engine over the fleet as it will be once the migrations in flight
        (``targets``: VM id -> target host) have landed: their VMs count on their target only
        (whose allocation holds the reservation already)."""
        by_host: dict[str, list[VMPlacementInfo]] = {}
        leaving: dict[str, list[VM]] = {}
        for vm in vms:
            if vm.host is None:
                continue
            target = targets.get(vm.id)
            if target is not None and target != vm.host:
                leaving.setdefault(vm.host, []).append(vm)
            by_host.setdefault(target or vm.host, []).append(
                VMPlacementInfo(vm.id, vm.spec.placement.group))
        adjusted = []
        for h in hosts:
            allocated = h.allocated
            for vm in leaving.get(h.name, ()):
                allocated = allocated - vm.spec.resources
            adjusted.append(h.model_copy(update={"allocated": allocated}))
        return PlacementEngine.from_hosts(adjusted, by_host)

    @staticmethod
    def _movable(vm: VM, hosts: dict[str, Host], fleet: list[Host],
                 path: Callable[[str, str, str], bool]) -> Movable | None:
        if (vm.host is None or vm.migration is not None or unsettled(vm)
                or vm.desired == PowerState.DELETED
                or vm.spec.labels.get(OPT_OUT_LABEL) == "false"):
            return None
        source = hosts.get(vm.host)
        if source is None or source.state != HostState.UP:
            return None
        mode = {VMState.RUNNING: "live", VMState.STOPPED: "cold"}.get(vm.state)
        if mode is None or not any(path(mode, source.driver, h.driver) for h in fleet
                                   if h.name != source.name):
            return None
        excluded = frozenset(h.name for h in fleet if not path(mode, source.driver, h.driver))
        request = dataclasses.replace(placement_request(vm.spec, tenant=vm.tenant),
                                      exclude_hosts=excluded)
        return Movable(vm.id, vm.name, vm.host, request, mode)
