"""``novacron whoami``, ``tenant``, ``token``, ``user``, ``role``, ``binding`` and ``audit``."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from novacron.cli.cluster import connect
from novacron.cli.render import err, out
from novacron.config import Settings


def cmd_auth(args: argparse.Namespace, settings: Settings) -> int:
    """tenant / token / user / role / binding / audit subcommands."""
    nc = connect(args, settings)
    group, op = args.command, getattr(args, "sub", None)
    calls: dict[tuple[str, str | None], Callable[[], Any]] = {
        ("whoami", None): lambda: nc.whoami(),
        ("tenant", "list"): lambda: nc.call("list_tenants"),
        ("tenant", "create"): lambda: nc.call("create_tenant", args.name, _quota(args),
                                              args.require_mfa),
        ("tenant", "quota"): lambda: nc.call("update_tenant", args.name, _quota(args)),
        ("tenant", "delete"): lambda: nc.call("delete_tenant", args.name),
        ("token", "list"): lambda: nc.call("list_tokens", args.tenant),
        ("token", "create"): lambda: nc.call("create_token", args.name, args.role, args.tenant,
                                             args.ttl_days * 86400),
        ("token", "revoke"): lambda: nc.call("revoke_token", args.id),
        ("user", "list"): lambda: nc.call("list_users", args.tenant),
        ("user", "create"): lambda: nc.call("create_user", args.name, _password(), args.tenant),
        ("user", "delete"): lambda: nc.call("delete_user", args.tenant, args.name),
        ("user", "unlock"): lambda: nc.call("unlock_user", args.tenant, args.name),
        ("role", "list"): lambda: nc.call("list_roles"),
        ("role", "put"): lambda: nc.call("put_role", args.name, args.permission,
                                         args.description),
        ("role", "delete"): lambda: nc.call("delete_role", args.name),
        ("binding", "list"): lambda: nc.call("list_bindings", args.tenant),
        ("binding", "create"): lambda: nc.call("bind", args.principal, args.role, args.tenant),
        ("binding", "delete"): lambda: nc.call("unbind", args.principal, args.role,
                                               args.tenant),
        ("audit", "list"): lambda: nc.call("audit", args.since, args.tenant),
        ("audit", "verify"): lambda: nc.call("verify_audit"),
    }
    result = calls[(group, op)]()
    if result is not None:
        out.print_json(data=result)
    if (group, op) == ("audit", "verify") and not result["intact"]:
        err.print(f"[bold red]the audit log was tampered with[/] at entry "
                  f"{result['first_bad_index']}")
        return 3
    return 0


def _quota(args: argparse.Namespace) -> dict[str, int]:
    return {k: v for k, v in (("vcpus", args.vcpus), ("memory_mib", args.memory_mib),
                              ("disk_gib", args.disk_gib), ("vms", args.vms)) if v is not None}


def _password() -> str:
    password = os.environ.get("NOVACRON_PASSWORD")
    if password:
        return password
    import getpass

    return getpass.getpass("password: ")


_POSITIONAL_TENANT = {("user", "delete"), ("user", "unlock"), ("binding", "create"),
                      ("binding", "delete")}


def add_auth_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    sub.add_parser("whoami", parents=[common], help="who the token is").set_defaults(
        func=cmd_auth)
    quota = argparse.ArgumentParser(add_help=False)
    for flag in ("vcpus", "memory-mib", "disk-gib", "vms"):
        quota.add_argument(f"--{flag}", type=int)
    groups = {
        "tenant": {"list": [], "create": ["name", "quota", "mfa"], "quota": ["name", "quota"],
                   "delete": ["name"]},
        "token": {"list": ["tenant"], "create": ["name", "role", "tenant", "ttl"],
                  "revoke": ["id"]},
        "user": {"list": ["tenant"], "create": ["name", "tenant"],
                 "delete": ["tenant", "name"], "unlock": ["tenant", "name"]},
        "role": {"list": [], "put": ["name", "permission", "description"], "delete": ["name"]},
        "binding": {"list": ["tenant"], "create": ["principal", "role", "tenant"],
                    "delete": ["principal", "role", "tenant"]},
        "audit": {"list": ["since", "tenant"], "verify": []},
    }
    for group, ops in groups.items():
        p = sub.add_parser(group, parents=[common], help=f"manage {group}s" if group != "audit"
                           else "read and verify the audit log")
        gsub = p.add_subparsers(dest="sub", required=True)
        for op, fields in ops.items():
            parents = [common, quota] if "quota" in fields else [common]
            q = gsub.add_parser(op, parents=parents)
            for f in fields:
                if f == "tenant":
                    required = (group, op) in _POSITIONAL_TENANT
                    q.add_argument("tenant" if required else "--tenant")
                elif f == "mfa":
                    q.add_argument("--require-mfa", action="store_true")
                elif f == "ttl":
                    q.add_argument("--ttl-days", type=float, default=90.0)
                elif f == "since":
                    q.add_argument("--since", type=int, default=0)
                elif f == "permission":
                    q.add_argument("--permission", action="append", default=[],
                                   help="resource:verb, e.g. vms:read")
                elif f == "description":
                    q.add_argument("--description", default="")
                elif f != "quota":
                    q.add_argument(f)
        p.set_defaults(func=cmd_auth)

