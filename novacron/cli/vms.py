"""``novacron vm ...``: create, list, act on and snapshot VMs."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.table import Table

from novacron.cli.cluster import connect
from novacron.cli.render import out, print_records, vm_table
from novacron.config import Settings
from novacron.errors import InvalidRequest

_SETTLES = {"start": "running", "stop": "stopped", "reboot": "running", "pause": "paused",
            "resume": "running", "delete": "deleted", "create": "running"}


def cmd_vm(args: argparse.Namespace, settings: Settings) -> int:
    nc = connect(args, settings)
    action = args.vm_cmd
    if action == "list":
        vms = [h.record for h in nc.vms.list(host=args.host)]
        print_records(args, vms, lambda: vm_table(vms))
        return 0
    if action == "create":
        labels = dict(kv.split("=", 1) for kv in args.label)
        vm = nc.vms.create(args.name, cpus=args.cpus, memory_mib=args.memory,
                           disk_gib=args.disk, image=args.image, labels=labels, host=args.host,
                           start=not args.no_start)
        settle = "running" if not args.no_start else "stopped"
    else:
        vm = nc.vms.get(args.ref)
        if action == "snapshot":
            return _snapshot(args, vm)
        if action == "show":
            print_records(args, [vm.record], lambda: vm_table([vm.record], vm.name))
            return 0
        if action == "delete":
            vm.delete()
        elif action == "stop":
            vm.stop(force=args.force)
        else:
            getattr(vm, action)()
        settle = _SETTLES[action]
    if args.wait:
        with out.status(f"Waiting for {vm.name} to be {settle}..."):
            vm.wait_for(settle, timeout=args.timeout)
    if action == "delete" and (args.wait or vm.state.value == "deleted"):
        out.print(f"VM {vm.name} deleted")
        return 0
    print_records(args, [vm.record], lambda: vm_table([vm.record], vm.name))
    return 0


def _snapshot(args: argparse.Namespace, vm: Any) -> int:
    op = args.snapshot_cmd
    if op != "list" and not args.name:
        raise InvalidRequest(f"vm snapshot {op} needs a snapshot name")
    if op == "create":
        result: Any = vm.snapshot(args.name)
    elif op == "revert":
        result = vm.revert(args.name).record.model_dump(mode="json")
    elif op == "delete":
        vm.delete_snapshot(args.name)
        result = {"deleted": args.name}
    else:
        result = vm.snapshots()
    if args.json or op != "list":
        out.print_json(data=result)
    else:
        table = Table(title=f"Snapshots of {vm.name}")
        for col in ("NAME", "STATE", "CREATED", "PARENT"):
            table.add_column(col)
        for s in result:
            table.add_row(s.get("name", ""), s.get("state", ""),
                          time.strftime("%Y-%m-%d %H:%M:%S",
                                        time.localtime(s.get("created_at", 0))),
                          s.get("parent") or "")
        out.print(table)
    return 0

