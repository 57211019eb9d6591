"""The ``novacron`` command: run the control plane and manage hosts and VMs from a shell."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from novacron.config import Settings
from novacron.errors import InvalidRequest, NovaCronError, OperationTimeout, Unavailable
from novacron.model import VM, Host

out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)
log = logging.getLogger("novacron.cli")


# -- the local Ray head that `up` starts -------------------------------------------------------
def ray_temp_dir(state_dir: Path) -> Path:
    """The Ray temp dir of the cluster serving ``state_dir`` (short: Unix socket paths are)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return Path("/tmp") / f"ray-novacron-{digest}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _cluster_file(settings: Settings) -> Path:
    return settings.state_dir / "cluster.json"


def start_ray_head(settings: Settings) -> str:
    """Start a Ray head on 127.0.0.1 for this state dir (or find the running one); its address."""
    address = f"127.0.0.1:{settings.ray_port}"
    if _port_open(settings.ray_port):
        return address
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head",
           "--node-ip-address", "127.0.0.1", "--port", str(settings.ray_port),
           "--temp-dir", str(ray_temp_dir(settings.state_dir)),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(settings.dashboard_port),
           "--dashboard-agent-listen-port", str(_free_port()),
           "--ray-client-server-port", str(_free_port()),
           "--disable-usage-stats"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Unavailable(f"could not start Ray: {proc.stderr.strip()[-2000:]}",
                          details={"command": " ".join(cmd)})
    return address


def stop_ray_head(settings: Settings, node_ids: Sequence[str] = ()) -> int:
    """Stop the Ray processes of this state dir's cluster only; how many were signalled.

    They are found by the cluster's temp dir or node ids on their command lines, with every
    descendant (Ray's workers do not carry either).
    """
    import psutil

    markers = [str(ray_temp_dir(settings.state_dir)), *(f"--node-id={n}" for n in node_ids)]
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or ())
            if any(marker in cmdline for marker in markers):
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    tree = {p.pid: p for p in procs}
    for proc in procs:
        try:
            for child in proc.children(recursive=True):
                tree[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    for proc in tree.values():
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(list(tree.values()), timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    return len(tree)


def _ray_init(address: str, namespace: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, namespace=namespace, logging_level=logging.WARNING,
                 log_to_driver=False)


def _address(args: argparse.Namespace, settings: Settings) -> str:
    if args.address:
        return str(args.address)
    cluster = _cluster_file(settings)
    if cluster.exists():
        try:
            return str(json.loads(cluster.read_text())["address"])
        except (ValueError, KeyError):
            raise InvalidRequest(f"{cluster} is corrupt; remove it and run novacron up") from None
    return "auto"


def _wait_http(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise OperationTimeout(f"{url} did not answer within {timeout_s:g} s")


# -- commands ----------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from actors.runtime import start_control_plane
    from serve.deployment import deploy

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with out.status("Starting Ray..."):
        address = start_ray_head(settings)
        _ray_init(address, settings.namespace)
    _cluster_file(settings).write_text(json.dumps({"address": address}))
    with out.status("Starting the controller and hosts..."):
        start_control_plane(settings)
    with out.status("Starting the HTTP API..."):
        deploy(settings)
        _wait_http(f"http://{settings.api_host}:{settings.api_port}/readyz", 120)
    api = f"http://{settings.api_host}:{settings.api_port}"
    out.print(f"[bold green]NovaCron is up[/] (state in {settings.state_dir})")
    out.print(f"  HTTP API        {api}/api/v1   (OpenAPI docs: {api}/docs)")
    out.print(f"  Ray dashboard   http://127.0.0.1:{settings.dashboard_port}")
    out.print(f"  Ray address     {address}")
    out.print(f"  Admin token     {settings.state_dir / 'admin.token'} (mode 0600): "
              f"curl -H \"Authorization: Bearer $(cat {settings.state_dir}/admin.token)\" "
              f"{api}/api/v1/vms")
    out.print("  Try             novacron status | novacron vm list | novacron demo")
    out.print(f"  Stop            novacron down --state-dir {settings.state_dir}"
              "   (guests keep running; add --stop-guests to stop them)")
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    address = _address(args, settings)
    result = {"vms": 0, "guests_stopped": 0}
    node_ids: list[str] = []
    try:
        _ray_init(address, settings.namespace)
    except ConnectionError:
        out.print("Ray is not running here; nothing to stop.")
    else:
        from ray import serve

        from actors.runtime import stop_control_plane

        with out.status("Stopping the control plane..."):
            result = stop_control_plane(settings.namespace, stop_guests=args.stop_guests)
            serve.shutdown()  # type: ignore[no-untyped-call]
        import ray

        node_ids = [n["NodeID"] for n in ray.nodes()]  # type: ignore[no-untyped-call]
        ray.shutdown()
    stopped = stop_ray_head(settings, node_ids)
    _cluster_file(settings).unlink(missing_ok=True)
    guests = (f"{result['guests_stopped']} guest(s) stopped" if args.stop_guests
              else "guests left running")
    out.print(f"NovaCron is down ({result['vms']} VM(s) in the store, {guests}; "
              f"{stopped} Ray process(es) stopped).")
    return 0


def _connect(args: argparse.Namespace, settings: Settings) -> Any:
    from novacron.client import connect

    return connect(_address(args, settings), namespace=settings.namespace,
                   token=args.token, state_dir=settings.state_dir)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    nc = _connect(args, settings)
    status = nc.status()
    if args.json:
        out.print_json(data=status)
        return 0
    out.print(f"[bold]NovaCron[/] store revision {status['revision']}")
    out.print(f"  hosts  {status['hosts_up']}/{status['hosts']} up")
    states = ", ".join(f"{n} {s}" for s, n in sorted(status["vms_by_state"].items())) or "none"
    out.print(f"  VMs    {status['vms']} ({states})")
    return 0


def _vm_table(vms: Sequence[VM], title: str = "VMs") -> Table:
    table = Table(title=title)
    for col in ("NAME", "ID", "STATE", "HOST", "CPUS", "MEMORY", "DISK", "ERROR"):
        table.add_column(col)
    for vm in vms:
        table.add_row(vm.name, vm.id, vm.state.value, vm.host or "-", str(vm.spec.cpus),
                      f"{vm.spec.memory_mib} MiB", f"{vm.spec.disk_gib} GiB",
                      vm.last_error or "")
    return table


def _host_table(hosts: Sequence[Host]) -> Table:
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


def _print_records(args: argparse.Namespace, records: Sequence[VM | Host],
                   table: Callable[[], Table]) -> None:
    if args.json:
        out.print_json(data=[r.model_dump(mode="json") for r in records])
    else:
        out.print(table())


def cmd_host(args: argparse.Namespace, settings: Settings) -> int:
    nc = _connect(args, settings)
    if args.host_cmd == "list":
        hosts = nc.hosts.list()
        _print_records(args, hosts, lambda: _host_table(hosts))
    elif args.host_cmd == "show":
        host = nc.hosts.get(args.name)
        _print_records(args, [host], lambda: _host_table([host]))
        if host.drain is not None and not args.json:
            out.print(_drain_table(host))
    elif args.host_cmd == "drain":
        return _drain(args, nc)
    elif args.host_cmd == "add":
        capacity = None
        if args.cpus or args.memory or args.disk:
            capacity = {"cpus": args.cpus or 0, "memory_mib": args.memory or 0,
                        "disk_gib": args.disk or 0}
        host = nc.hosts.register(args.name, driver=args.driver, uri=args.uri, capacity=capacity,
                                 labels=dict(kv.split("=", 1) for kv in args.label))
        _print_records(args, [host], lambda: _host_table([host]))
    elif args.host_cmd == "maintenance":
        host = nc.hosts.maintenance(args.name)
        _print_records(args, [host], lambda: _host_table([host]))
    elif args.host_cmd == "activate":
        host = nc.hosts.activate(args.name)
        _print_records(args, [host], lambda: _host_table([host]))
    elif args.host_cmd == "delete":
        nc.hosts.delete(args.name)
        out.print(f"host {args.name} removed")
    return 0


def _drain_table(host: Host) -> Table:
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
        out.print(_drain_table(host))
    if args.wait and not args.cancel:
        return 0 if host.drain is not None and host.drain.state == DrainState.COMPLETED else 1
    return 0


def cmd_rebalance(args: argparse.Namespace, settings: Settings) -> int:
    """The rebalancer's proposed moves (``--apply``: start them)."""
    nc = _connect(args, settings)
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


_SETTLES = {"start": "running", "stop": "stopped", "reboot": "running", "pause": "paused",
            "resume": "running", "delete": "deleted", "create": "running"}


def cmd_vm(args: argparse.Namespace, settings: Settings) -> int:
    nc = _connect(args, settings)
    action = args.vm_cmd
    if action == "list":
        vms = [h.record for h in nc.vms.list(host=args.host)]
        _print_records(args, vms, lambda: _vm_table(vms))
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
            _print_records(args, [vm.record], lambda: _vm_table([vm.record], vm.name))
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
    _print_records(args, [vm.record], lambda: _vm_table([vm.record], vm.name))
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


def cmd_auth(args: argparse.Namespace, settings: Settings) -> int:
    """tenant / token / user / role / binding / audit subcommands."""
    nc = _connect(args, settings)
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


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    """Where ``--count`` VMs of one shape would go (nothing is created)."""
    from novacron.model import VMCreate

    nc = _connect(args, settings)
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


def _size(n: float) -> str:
    """Bytes for people: ``512 B``, ``3.2 MiB``..."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Move a VM to another host with a progress bar, or print the prediction (``--dry-run``)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from novacron.states import MigrationPhase

    nc = _connect(args, settings)
    policy = {"auto_converge": args.auto_converge, "max_downtime_ms": args.max_downtime_ms,
              "bandwidth_mib_s": args.bandwidth, "verify": args.verify}
    if args.dry_run:
        prediction = nc.migrations.predict(args.ref, to=args.to, mode=args.mode, policy=policy)
        if args.json:
            out.print_json(data=prediction)
        else:
            out.print(f"[bold]{args.mode} migration of {args.ref} to {args.to}[/] (prediction, "
                      "nothing moved)")
            out.print(f"  passes {prediction['passes']}, {_size(prediction['bytes'])} to send, "
                      f"{prediction['duration_s']:.1f} s, downtime "
                      f"{prediction['downtime_s'] * 1000:.0f} ms, "
                      f"{'converges' if prediction['converges'] else 'does NOT converge'}")
        return 0
    mig = nc.migrations.start(args.ref, to=args.to, mode=args.mode, policy=policy)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    deadline = time.monotonic() + args.timeout
    with Progress(*columns, console=out, disable=args.json) as bar:
        task = bar.add_task(mig.id, total=100, detail="")
        while mig.refresh().phase not in (MigrationPhase.COMPLETED, MigrationPhase.ROLLED_BACK,
                                          MigrationPhase.FAILED):
            p = mig.record.progress
            detail = (f"{mig.phase.value} pass {p.iteration} {_size(p.bytes_sent)} sent, "
                      f"{_size(p.rate)}/s")
            bar.update(task, completed=p.percent, detail=detail)
            if time.monotonic() > deadline:
                raise OperationTimeout(f"migration {mig.id} is still {mig.phase.value} after "
                                       f"{args.timeout:g} s (it goes on; see its record)")
            time.sleep(0.2)
        bar.update(task, completed=mig.record.progress.percent, detail=mig.phase.value)
    record = mig.record
    if args.json:
        out.print_json(data=record.model_dump(mode="json"))
    else:
        o = record.outcome
        out.print(f"[bold]{record.id}[/] {record.mode} {record.source} -> {record.target}: "
                  f"[{'green' if record.phase == MigrationPhase.COMPLETED else 'red'}]"
                  f"{record.phase.value}[/]" + (f" ({record.reason})" if record.reason else ""))
        if record.phase == MigrationPhase.COMPLETED:
            out.print(f"  total {o.get('total_s', 0):.2f} s, downtime "
                      f"{o.get('downtime_ms', 0):.0f} ms, {_size(o.get('bytes', 0))} sent, "
                      f"{record.progress.iteration} pass(es)")
    return 0 if record.phase == MigrationPhase.COMPLETED else 1


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from novacron.errors import NotFound

    nc = _connect(args, settings)
    shapes = [("demo-web", 2, 2048), ("demo-db", 4, 8192), ("demo-cache", 1, 1024)]
    for name, _, _ in shapes:
        try:
            old = nc.vms.get(name)
        except NotFound:
            continue
        out.print(f"removing {name} from an earlier demo")
        old.delete().wait_for("deleted", timeout=60)
    out.rule("1. create three VMs (placement picks their hosts)")
    vms = [nc.vms.create(n, cpus=c, memory_mib=m, disk_gib=2,
                         workload={"dirty_rate_mib_s": 1.0, "cpu_busy": 0.02})
           for n, c, m in shapes]
    for vm in vms:
        vm.wait_for("running", timeout=args.timeout)
    out.print(_vm_table([vm.record for vm in vms], "Running"))
    out.rule("2. stop demo-cache, then start it again")
    cache = vms[2]
    cache.stop().wait_for("stopped", timeout=args.timeout)
    out.print(f"demo-cache is {cache.state.value} (guest stopped on {cache.host})")
    cache.start().wait_for("running", timeout=args.timeout)
    out.print(f"demo-cache is {cache.state.value} again on {cache.host} "
              f"(guest pid {cache.record.guest_id})")
    out.rule("3. where everything was placed")
    out.print(_host_table(nc.hosts.list()))
    out.print("The demo VMs keep running: see them with `novacron vm list` or "
              "GET /api/v1/vms; remove one with `novacron vm delete demo-web`.")
    return 0


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

    parser = argparse.ArgumentParser(prog="novacron", description=__doc__, parents=[common])
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
    _auth_parsers(sub, common)
    return parser


_POSITIONAL_TENANT = {("user", "delete"), ("user", "unlock"), ("binding", "create"),
                      ("binding", "delete")}


def _auth_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
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


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for arg, field in (("state_dir", "state_dir"), ("namespace", "namespace"),
                       ("hosts", "sim_hosts"), ("port", "api_port"),
                       ("dashboard_port", "dashboard_port"), ("ray_port", "ray_port")):
        value = getattr(args, arg, None)
        if value is not None:
            overrides[field] = value
    settings = Settings(**overrides)
    return settings.model_copy(update={"state_dir": settings.state_dir.expanduser().resolve()})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``novacron`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for kv in getattr(args, "label", []):
        if "=" not in kv:
            parser.error(f"--label takes key=value, got {kv!r}")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the head and every client must agree
    try:
        settings = _settings(args)
        code: int = args.func(args, settings)
        return code
    except NovaCronError as exc:
        err.print(f"[bold red]error[/] ({exc.code}): {exc.message}")
        return 1
    except ValueError as exc:  # pydantic validation of arguments
        err.print(f"[bold red]error[/]: {exc}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

