"""The ``novacron`` command's arguments and the settings they override."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from novacron.cli.access import add_auth_parsers
from novacron.cli.cluster import cmd_demo, cmd_down, cmd_status, cmd_up
from novacron.cli.hosts import cmd_host, cmd_plan, cmd_rebalance
from novacron.cli.migrate import cmd_migrate
from novacron.cli.vms import cmd_vm
from novacron.config import Settings


# -- parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", type=Path, help="state directory (default ~/.novacron)")
    common.add_argument("--address", help="Ray address of the cluster (default: from state dir)")
    common.add_argument("--namespace", help="Ray namespace (default novacron)")
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    common.add_argument("--token", help="API token (default: $NOVACRON_TOKEN, else the admin "
                        "token in the state dir)")
    common.add_argument("-v", "--verbose", action="store_true", help="log more")

    parser = argparse.ArgumentParser(prog="novacron", description=DESCRIPTION, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="start NovaCron (local Ray, API, sim hosts)")
    up.add_argument("--hosts", type=int, help="simulated hosts on a new state dir (default 4)")
    up.add_argument("--port", type=int, help="HTTP API port (default 8000)")
    up.add_argument("--dashboard-port", type=int, help="Ray dashboard port (default 8265)")
    up.add_argument("--ray-port", type=int, help="Ray GCS port (default 6379)")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", parents=[common], help="stop NovaCron")
    down.add_argument("--stop-guests", action="store_true", help="also stop every guest")
    down.add_argument("--ray-port", type=int, help=argparse.SUPPRESS)
    down.set_defaults(func=cmd_down)

    sub.add_parser("status", parents=[common], help="show hosts and VMs by state").set_defaults(
        func=cmd_status)
    demo = sub.add_parser("demo", parents=[common], help="a short tour: create, stop, start")
    demo.add_argument("--timeout", type=float, default=90.0)
    demo.set_defaults(func=cmd_demo)

    host = sub.add_parser("host", parents=[common], help="manage hosts")
    hsub = host.add_subparsers(dest="host_cmd", required=True)
    hsub.add_parser("list", parents=[common])
    for name in ("show", "maintenance", "activate", "delete"):
        hsub.add_parser(name, parents=[common]).add_argument("name")
    drain = hsub.add_parser("drain", parents=[common],
                            help="move every VM off a host, then put it in maintenance")
    drain.add_argument("name")
    drain.add_argument("--cancel", action="store_true",
                       help="stop the drain: its migrations roll back, the host is up again")
    drain.add_argument("--wait", action="store_true", help="follow the drain to its end")
    drain.add_argument("--timeout", type=float, default=1800.0)
    add = hsub.add_parser("add", parents=[common])
    add.add_argument("name")
    add.add_argument("--driver", default="sim")
    add.add_argument("--uri")
    add.add_argument("--cpus", type=float)
    add.add_argument("--memory", type=int, help="MiB")
    add.add_argument("--disk", type=int, help="GiB")
    add.add_argument("--label", action="append", default=[], help="key=value")
    host.set_defaults(func=cmd_host)

    vm = sub.add_parser("vm", parents=[common], help="manage VMs")
    vsub = vm.add_subparsers(dest="vm_cmd", required=True)
    lst = vsub.add_parser("list", parents=[common])
    lst.add_argument("--host")
    create = vsub.add_parser("create", parents=[common])
    create.add_argument("name")
    create.add_argument("--cpus", type=int, default=1)
    create.add_argument("--memory", type=int, default=512, help="MiB")
    create.add_argument("--disk", type=int, default=1, help="GiB")
    create.add_argument("--image")
    create.add_argument("--host", help="pin to this host")
    create.add_argument("--label", action="append", default=[], help="key=value")
    create.add_argument("--no-start", action="store_true")
    for name in ("show", "start", "stop", "reboot", "pause", "resume", "delete"):
        p = vsub.add_parser(name, parents=[common])
        p.add_argument("ref", help="VM id or name")
        if name == "stop":
            p.add_argument("--force", action="store_true", help="power off at once")
    snap = vsub.add_parser("snapshot", parents=[common], help="create, list, revert, delete")
    snap.add_argument("snapshot_cmd", choices=["create", "list", "revert", "delete"])
    snap.add_argument("ref", help="VM id or name")
    snap.add_argument("name", nargs="?", help="snapshot name")
    for p in vsub.choices.values():
        p.add_argument("--wait", action="store_true", help="wait until the VM settles")
        p.add_argument("--timeout", type=float, default=120.0)
    vm.set_defaults(func=cmd_vm)
    plan = sub.add_parser("plan", parents=[common], help="where VMs would go (a dry run)")
    plan.add_argument("name", nargs="?", default="planned")
    plan.add_argument("--count", type=int, default=1)
    plan.add_argument("--cpus", type=int, default=1)
    plan.add_argument("--memory", type=int, default=512, help="MiB")
    plan.add_argument("--disk", type=int, default=1, help="GiB")
    plan.add_argument("--tenant")
    plan.add_argument("--group", help="keep these VMs together or apart")
    plan.add_argument("--affinity", choices=["affinity", "anti-affinity"],
                      default="anti-affinity")
    plan.add_argument("--domain", help="failure-domain label (e.g. zone)")
    plan.add_argument("--soft", action="store_true", help="a preference, not a rule")
    plan.set_defaults(func=cmd_plan)
    rebalance = sub.add_parser("rebalance", parents=[common],
                               help="moves that even out the hosts (a proposal unless --apply)")
    rebalance.add_argument("--apply", action="store_true", help="start the proposed migrations")
    rebalance.set_defaults(func=cmd_rebalance)
    migrate = sub.add_parser("migrate", parents=[common], help="move a VM to another host")
    migrate.add_argument("ref", help="VM id or name")
    migrate.add_argument("--to", required=True, help="target host")
    migrate.add_argument("--mode", choices=["cold", "warm", "live"], default="live")
    migrate.add_argument("--auto-converge", action="store_true",
                         help="throttle the guest if pre-copy does not converge")
    migrate.add_argument("--max-downtime-ms", type=int, default=300)
    migrate.add_argument("--bandwidth", type=float, help="cap in MiB/s")
    migrate.add_argument("--verify", action="store_true",
                         help="compare memory digests during the pause (longer downtime)")
    migrate.add_argument("--dry-run", action="store_true",
                         help="print the cost model's prediction; move nothing")
    migrate.add_argument("--timeout", type=float, default=600.0)
    migrate.set_defaults(func=cmd_migrate)
    add_auth_parsers(sub, common)
    return parser


DESCRIPTION = "Run the NovaCron control plane and manage hosts, VMs and migrations from a shell."

def settings_from(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for arg, field in (("state_dir", "state_dir"), ("namespace", "namespace"),
                       ("hosts", "sim_hosts"), ("port", "api_port"),
                       ("dashboard_port", "dashboard_port"), ("ray_port", "ray_port")):
        value = getattr(args, arg, None)
        if value is not None:
            overrides[field] = value
    settings = Settings(**overrides)
    return settings.model_copy(update={"state_dir": settings.state_dir.expanduser().resolve()})

