"""Running NovaCron from a shell: ``up`` (a private Ray head, the control plane, the API),
``down``, ``status`` and ``demo``; how the other commands reach the cluster."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from novacron.cli.render import host_table, out, vm_table
from novacron.config import Settings
from novacron.errors import InvalidRequest, OperationTimeout, Unavailable


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


def wait_http(url: str, timeout_s: float = 120.0) -> None:
    """Wait until ``url`` answers 200; OperationTimeout after ``timeout_s``."""
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
        wait_http(f"http://{settings.api_host}:{settings.api_port}/readyz", 120)
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


def connect(args: argparse.Namespace, settings: Settings) -> Any:
    from novacron.client import connect

    return connect(_address(args, settings), namespace=settings.namespace,
                   token=args.token, state_dir=settings.state_dir)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    nc = connect(args, settings)
    status = nc.status()
    if args.json:
        out.print_json(data=status)
        return 0
    out.print(f"[bold]NovaCron[/] store revision {status['revision']}")
    out.print(f"  hosts  {status['hosts_up']}/{status['hosts']} up")
    states = ", ".join(f"{n} {s}" for s, n in sorted(status["vms_by_state"].items())) or "none"
    out.print(f"  VMs    {status['vms']} ({states})")
    return 0


def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from novacron.errors import NotFound

    nc = connect(args, settings)
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
    out.print(vm_table([vm.record for vm in vms], "Running"))
    out.rule("2. stop demo-cache, then start it again")
    cache = vms[2]
    cache.stop().wait_for("stopped", timeout=args.timeout)
    out.print(f"demo-cache is {cache.state.value} (guest stopped on {cache.host})")
    cache.start().wait_for("running", timeout=args.timeout)
    out.print(f"demo-cache is {cache.state.value} again on {cache.host} "
              f"(guest pid {cache.record.guest_id})")
    out.rule("3. where everything was placed")
    out.print(host_table(nc.hosts.list()))
    out.print("The demo VMs keep running: see them with `novacron vm list` or "
              "GET /api/v1/vms; remove one with `novacron vm delete demo-web`.")
    return 0

