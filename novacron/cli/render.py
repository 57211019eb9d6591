"""How the ``novacron`` command prints: rich tables of hosts, VMs and drains, sizes, JSON."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from rich.console import Console
from rich.table import Table

from novacron.model import VM, Host

out = Console(width=None if sys.stdout.isatty() else 160)


err = Console(stderr=True)


def vm_table(vms: Sequence[VM], title: str = "VMs") -> Table:
    table = Table(title=title)
    for col in ("NAME", "ID", "STATE", "HOST", "CPUS", "MEMORY", "DISK", "ERROR"):
        table.add_column(col)
    for vm in vms:
        table.add_row(vm.name, vm.id, vm.state.value, vm.host or "-", str(vm.spec.cpus),
                      f"{vm.spec.memory_mib} MiB", f"{vm.spec.disk_gib} GiB",
                      vm.last_error or "")
    return table


def host_table(hosts: Sequence[Host]) -> Table:
    table = Table(title="Hosts")
    for col in ("NAME", "DRIVER", "STATE", "CPUS (used/limit)", "MEMORY MiB (used/limit)",
                "DISK GiB (used/limit)", "LABELS"):
        table.add_column(col)
    for h in hosts:
        lim = h.limit
        table.add_row(h.name, h.driver, h.state.value,
                      f"{h.allocated.cpus:g}/{lim.cpus:g}",
                      f"{h.allocated.memory_mib}/{lim.memory_mib}",
                      f"{h.allocated.disk_gib}/{lim.disk_gib}",
                      ",".join(f"{k}={v}" for k, v in h.labels.items()))
    return table


def print_records(args: argparse.Namespace, records: Sequence[VM | Host],
                   table: Callable[[], Table]) -> None:
    if args.json:
        out.print_json(data=[r.model_dump(mode="json") for r in records])
    else:
        out.print(table())


def drain_table(host: Host) -> Table:
    """A host's drain: where it stands, and each VM not yet gone."""
    drain = host.drain
    assert drain is not None
    table = Table(title=f"Drain of {host.name} ({host.state.value}): {drain.state.value}",
                  caption=drain.message)
    for col in ("VM", "STATUS", "DETAIL"):
        table.add_column(col)
    for vm_id, mig in drain.migrating.items():
        table.add_row(vm_id, "migrating", mig)
    for vm_id, why in drain.waiting.items():
        table.add_row(vm_id, "waiting", why)
    for vm_id, why in drain.blocked.items():
        table.add_row(vm_id, "[red]blocked[/]", why)
    return table


def human_size(n: float) -> str:
    """Bytes for people: ``512 B``, ``3.2 MiB``..."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"

