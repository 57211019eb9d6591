"""``novacron host ...``, ``plan`` and ``rebalance``: hosts, drains and placement."""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.table import Table

from novacron.cli.cluster import connect
from novacron.cli.render import drain_table, host_table, out, print_records
from novacron.config import Settings
from novacron.errors import OperationTimeout
from novacron.model import Host


def cmd_host(args: argparse.Namespace, settings: Settings) -> int:
    nc = connect(args, settings)
    if args.host_cmd == "list":
        hosts = nc.hosts.list()
        print_records(args, hosts, lambda: host_table(hosts))
    elif args.host_cmd == "show":
        host = nc.hosts.get(args.name)
        print_records(args, [host], lambda: host_table([host]))
        if host.drain is not None and not args.json:
            out.print(drain_table(host))
    elif args.host_cmd == "drain":
        return _drain(args, nc)
    elif args.host_cmd == "add":
        capacity = None
        if args.cpus or args.memory or args.disk:
            capacity = {"cpus": args.cpus or 0, "memory_mib": args.memory or 0,
                        "disk_gib": args.disk or 0}
        host = nc.hosts.register(args.name, driver=args.driver, uri=args.uri, capacity=capacity,
                                 labels=dict(kv.split("=", 1) for kv in args.label))
        print_records(args, [host], lambda: host_table([host]))
    elif args.host_cmd == "maintenance":
        host = nc.hosts.maintenance(args.name)
        print_records(args, [host], lambda: host_table([host]))
    elif args.host_cmd == "activate":
        host = nc.hosts.activate(args.name)
        print_records(args, [host], lambda: host_table([host]))
    elif args.host_cmd == "delete":
        nc.hosts.delete(args.name)
        out.print(f"host {args.name} removed")
    return 0


def _drain(args: argparse.Namespace, nc: Any) -> int:
    """Start (or with ``--cancel`` stop) a host's drain; with ``--wait`` follow it to its end."""
    from novacron.states import DrainState

    name = args.name
    host: Host = nc.hosts.cancel_drain(name) if args.cancel else nc.hosts.drain(name)
    if args.wait and not args.cancel:
        deadline = time.monotonic() + args.timeout
        said = ""
        while host.drain is not None and host.drain.active:
            if not args.json and host.drain.message != said:
                said = host.drain.message
                out.print(f"{name}: drain {host.drain.state.value}: {said}")
            if time.monotonic() > deadline:
                raise OperationTimeout(f"the drain of {name} is still {host.drain.state.value} "
                                       f"after {args.timeout:g} s (it goes on; cancel it with "
                                       f"`novacron host drain {name} --cancel`)")
            time.sleep(0.5)
            host = nc.hosts.get(name)
    if args.json:
        out.print_json(data=host.model_dump(mode="json"))
    elif host.drain is not None:
        out.print(drain_table(host))
    if args.wait and not args.cancel:
        return 0 if host.drain is not None and host.drain.state == DrainState.COMPLETED else 1
    return 0


def cmd_rebalance(args: argparse.Namespace, settings: Settings) -> int:
    """The rebalancer's proposed moves (``--apply``: start them)."""
    nc = connect(args, settings)
    result = nc.rebalance(apply=args.apply)
    if args.json:
        out.print_json(data=result)
    else:
        table = Table(title="Rebalance" + ("" if args.apply else " (proposal; --apply starts it)"))
        for col in ("VM", "FROM", "TO", "MODE", "WHY", "MIGRATION" if args.apply else "GAIN"):
            table.add_column(col)
        for item in result["items"]:
            last = ((item["migration"] or f"[red]{item['error']['message']}[/]") if args.apply
                    else f"{item['gain']:.4f}")
            table.add_row(item["name"], item["source"], item["target"], item["mode"],
                          item["reason"], last)
        out.print(table)
        before, after = result["before"], result["after"]
        out.print(f"utilisation over {before['hosts']} up host(s): mean {before['mean']:.0%}, "
                  f"stdev {before['stdev']:.1%} -> {after['stdev']:.1%}, peak "
                  f"{before['peak']:.0%} -> {after['peak']:.0%}")
        for note in result["notes"]:
            out.print(f"  {note}")
    return 1 if any(item["error"] for item in result["items"]) else 0


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    """Where ``--count`` VMs of one shape would go (nothing is created)."""
    from novacron.model import VMCreate

    nc = connect(args, settings)
    placement: dict[str, Any] = {}
    if args.group:
        placement = {"group": args.group, "affinity": args.affinity, "hard": not args.soft,
                     "domain": args.domain}
    vms = [VMCreate.model_validate({
        "name": f"{args.name}-{i}" if args.count > 1 else args.name, "cpus": args.cpus,
        "memory_mib": args.memory, "disk_gib": args.disk, "tenant": args.tenant,
        "placement": placement}) for i in range(args.count)]
    result = nc.call("plan", vms)
    if args.json:
        out.print_json(data=result)
        return 0
    table = Table(title="Placement plan (dry run)")
    for col in ("VM", "HOST", "WHY"):
        table.add_column(col)
    for item in result:
        why = item["explanation"] if item["host"] else item["error"]["message"]
        table.add_row(item["name"], item["host"] or "[red]none[/]", why)
    out.print(table)
    return 0 if all(i["host"] for i in result) else 1

