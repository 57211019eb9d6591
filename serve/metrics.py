"""Prometheus metrics: API requests and latencies, VMs by state, host capacity and usage."""

from __future__ import annotations

import time
from typing import Any

from fastapi import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from novacron.store import Store

# Per-guest counters a host's heartbeat carries (GuestStats fields): field, metric, help.
_GUEST_COUNTERS = (
    ("cpu_time_s", "cpu_seconds", "CPU time the guest has used since it started"),
    ("memory_touched_bytes", "memory_touched_bytes", "Guest memory in use"),
    ("disk_read_bytes", "disk_read_bytes", "Bytes the guest has read from its disks"),
    ("disk_written_bytes", "disk_written_bytes", "Bytes the guest has written to its disks"),
    ("net_rx_bytes", "net_rx_bytes", "Bytes the guest has received"),
    ("net_tx_bytes", "net_tx_bytes", "Bytes the guest has sent"),
)
REGISTRY = CollectorRegistry()
REQUESTS = Counter("novacron_api_requests", "API requests served",
                   ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("novacron_api_request_seconds", "API request latency",
                    ["method", "route"], registry=REGISTRY,
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by its route template.

    A plain ASGI wrapper rather than Starlette's BaseHTTPMiddleware, which costs about a
    millisecond a request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            LATENCY.labels(scope["method"], path).observe(time.perf_counter() - start)
            REQUESTS.labels(scope["method"], path, str(status)).inc()


def render(store: Store, host_stats: dict[str, dict[str, Any]]) -> Response:
    """The exposition: request metrics plus a fresh snapshot of the fleet from the store."""
    fleet = CollectorRegistry()
    vms = Gauge("novacron_vms", "VMs by state", ["state"], registry=fleet)
    capacity = Gauge("novacron_host_capacity", "Host capacity after overcommit",
                     ["host", "resource"], registry=fleet)
    allocated = Gauge("novacron_host_allocated", "Resources promised to VMs on a host",
                      ["host", "resource"], registry=fleet)
    up = Gauge("novacron_host_up", "1 if the host is up", ["host", "state"], registry=fleet)
    cpu_load = Gauge("novacron_host_cpu_load", "Measured CPU load (0..1)", ["host"],
                     registry=fleet)
    memory_used = Gauge("novacron_host_memory_used_mib", "Measured memory in use", ["host"],
                        registry=fleet)
    health = Gauge("novacron_host_health", "Provider health figures a host reports (cloud "
                   "hosts: credentials valid, API reachable, throttled calls...)",
                   ["host", "figure"], registry=fleet)
    guest = {field: Gauge(f"novacron_vm_{name}", help_text, ["vm", "host"], registry=fleet)
             for field, name, help_text in _GUEST_COUNTERS}
    for state in ("pending", "stopped", "starting", "running", "paused", "stopping",
                  "migrating", "error", "unknown", "deleting"):
        vms.labels(state).set(store.count("vm", where={"state": state}))
    for record in store.all("host"):
        host = record.data
        name = host["name"]
        oc = host.get("overcommit", {})
        cap = host["capacity"]
        for resource, ratio in (("cpus", oc.get("cpu", 1.0)), ("memory_mib", oc.get("memory", 1.0)),
                                ("disk_gib", oc.get("disk", 1.0))):
            capacity.labels(name, resource).set(cap[resource] * ratio)
            allocated.labels(name, resource).set(host["allocated"][resource])
        up.labels(name, host["state"]).set(1 if host["state"] == "up" else 0)
        stats = host_stats.get(name)
        if stats:
            cpu_load.labels(name).set(stats.get("cpu_load", 0.0))
            memory_used.labels(name).set(stats.get("memory_used_mib", 0))
            for figure, value in (stats.get("extra") or {}).items():
                if isinstance(value, int | float):
                    health.labels(name, figure).set(value)
            for vm_id, counters in stats.get("guest_stats", {}).items():
                for field, gauge in guest.items():
                    gauge.labels(vm_id, name).set(counters.get(field, 0))
    body = generate_latest(REGISTRY) + generate_latest(fleet)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
