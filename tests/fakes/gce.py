"""A local fake of the Compute Engine REST API (``/compute/v1``), as google-cloud-compute's REST
transport uses it: zones, regions (CPU quotas and their usage), machine types (list and get),
instances, zonal operations; and of Cloud Monitoring's ``timeSeries.list`` (``/v3``) serving the
values a test puts in ``metrics``.

It behaves like GCE for what the GCP driver uses: list pages (``maxResults``/``pageToken`` ->
``nextPageToken``), label filters (``labels.k = "v" AND ...``), long-running zonal operations
that finish after a few reads (``GET`` or ``POST .../wait``), ``requestId`` idempotency (a
repeated id returns the first operation), ``labelFingerprint`` checks (412 conditionNotMet), errors
in GCE's JSON shape with a ``google.rpc.RequestInfo`` detail, and instance status transitions
(PROVISIONING -> RUNNING, STOPPING -> TERMINATED, SUSPENDING -> SUSPENDED ...).

Test controls: :meth:`GceFake.throttle` (429 rateLimitExceeded for the next N calls),
:meth:`GceFake.fail_operation` (the next operation of a type ends in an error, e.g.
QUOTA_EXCEEDED), :meth:`GceFake.delay` (execute a call, answer late), ``cpu_quotas`` (the
regions' CPU quota limits), ``tokens`` (the bearer tokens accepted; None accepts anonymous calls)
and ``calls`` (a count per route).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

MACHINE_TYPES = [  # name, vCPUs, memory MiB (a slice of the real catalogue)
    ("e2-micro", 2, 1024), ("e2-small", 2, 2048), ("e2-medium", 2, 4096),
    ("e2-standard-2", 2, 8192), ("e2-standard-4", 4, 16384), ("e2-standard-8", 8, 32768),
    ("n2-standard-2", 2, 8192), ("n2-standard-4", 4, 16384), ("n2-highmem-2", 2, 16384),
    ("n2-highcpu-8", 8, 8192), ("n2-standard-16", 16, 65536), ("c3-standard-4", 4, 16384),
]
# Regional CPU quotas: N2 and C3 machines count against their series' own, the rest (E2...)
# against CPUS; TERMINATED and SUSPENDED instances hold none.
CPU_QUOTAS = ("CPUS", "N2_CPUS", "C3_CPUS")
_TRANSITIONS = {  # operation type -> (status while it runs, status when done)
    "insert": ("PROVISIONING", "RUNNING"), "start": ("STAGING", "RUNNING"),
    "stop": ("STOPPING", "TERMINATED"), "suspend": ("SUSPENDING", "SUSPENDED"),
    "resume": ("STAGING", "RUNNING"), "reset": ("RUNNING", "RUNNING"),
    "delete": ("STOPPING", None),
}


class GceError(Exception):
    """An error answered in GCE's JSON shape."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


@dataclass
class _Operation:
    data: dict[str, Any]
    steps: int  # reads left before it is DONE
    apply: Callable[[], None]
    error: tuple[str, str, int] | None = None  # (code, message, http status)


@dataclass
class _Fault:
    kind: str  # "throttle" | "delay" | an operation type to fail
    remaining: int
    route: str | None = None
    seconds: float = 0.0
    error: tuple[str, str, int] | None = None


class GceFake:
    """The fake (see the module docstring). ``url`` is the client's ``api_endpoint``."""

    def __init__(self, project: str = "novacron-test",
                 zones: tuple[str, ...] = ("us-central1-a", "europe-west1-b"),
                 op_steps: int = 2, page_size: int = 500, cpu_quota: float = 24.0) -> None:
        self.project, self.zones, self.op_steps = project, zones, op_steps
        self.max_page = page_size
        self.cpu_quotas = dict.fromkeys(CPU_QUOTAS, cpu_quota)  # regional metric -> limit
        self._cpu_quota = cpu_quota
        self.tokens: set[str] | None = None
        self.calls: Counter[str] = Counter()
        self.instances: dict[tuple[str, str], dict[str, Any]] = {}  # (zone, name) -> instance
        self.metrics: dict[str, dict[str, float]] = {}  # Cloud Monitoring, per instance name
        self._ops: dict[str, _Operation] = {}
        self._request_ids: dict[str, str] = {}
        self._faults: list[_Fault] = []
        self._ids = itertools.count(1000)
        self._lock = threading.RLock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """Forget faults, tokens, counts and changed ``cpu_quotas`` (instances stay)."""
        with self._lock:
            self._faults.clear()
            self.tokens = None
            self.calls.clear()
            self.cpu_quotas = dict.fromkeys(CPU_QUOTAS, self._cpu_quota)

    # -- test controls ------------------------------------------------------------------------
    def throttle(self, count: int) -> None:
        """Answer the next ``count`` calls with 429 rateLimitExceeded."""
        with self._lock:
            self._faults.append(_Fault("throttle", count))

    def fail_operation(self, op_type: str, code: str, message: str, status: int = 403,
                       count: int = 1) -> None:
        """Make the next ``count`` ``op_type`` operations (e.g. "insert") end with ``code``."""
        with self._lock:
            self._faults.append(_Fault(op_type, count, error=(code, message, status)))

    def delay(self, route: str, seconds: float, count: int = 1) -> None:
        """Execute the next ``count`` calls of ``route`` (e.g. "insert"), answering late."""
        with self._lock:
            self._faults.append(_Fault("delay", count, route=route, seconds=seconds))

    def add_instance(self, zone: str, name: str, labels: dict[str, str],
                     status: str = "RUNNING", machine_type: str = "e2-small") -> None:
        """Create an instance directly (set-up of large lists)."""
        with self._lock:
            self.instances[(zone, name)] = self._instance(zone, name, labels, machine_type,
                                                          status, [])

    def _take(self, kind: str, route: str | None = None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.kind == kind and fault.route in (None, route):
                    fault.remaining -= 1
                    return fault
        return None

    # -- resources ----------------------------------------------------------------------------
    def _link(self, path: str) -> str:
        return f"{self.url}/compute/v1/projects/{self.project}/{path}"

    def _instance(self, zone: str, name: str, labels: dict[str, str], machine_type: str,
                  status: str, disks: list[dict[str, Any]]) -> dict[str, Any]:
        now = _rfc3339()
        return {"kind": "compute#instance", "id": str(next(self._ids)), "name": name,
                "zone": self._link(f"zones/{zone}"), "status": status,
                "machineType": self._link(f"zones/{zone}/machineTypes/{machine_type}"),
                "labels": labels, "labelFingerprint": uuid.uuid4().hex[:12],
                "creationTimestamp": now, "lastStartTimestamp": now, "disks": disks,
                "selfLink": self._link(f"zones/{zone}/instances/{name}")}

    def _get(self, zone: str, name: str) -> dict[str, Any]:
        self._zone(zone)
        instance = self.instances.get((zone, name))
        if instance is None:
            raise GceError(404, "notFound", f"The resource 'projects/{self.project}/zones/"
                                            f"{zone}/instances/{name}' was not found")
        return instance

    def _zone(self, zone: str) -> None:
        if zone not in self.zones:
            raise GceError(404, "notFound",
                           f"The resource 'projects/{self.project}/zones/{zone}' was not found")

    def _operation(self, zone: str, op_type: str, target: str, request_id: str | None,
                   apply: Callable[[], None]) -> dict[str, Any]:
        if request_id and request_id in self._request_ids:
            return self._ops[self._request_ids[request_id]].data
        name = f"operation-{uuid.uuid4().hex[:16]}"
        data = {"kind": "compute#operation", "id": str(next(self._ids)), "name": name,
                "zone": self._link(f"zones/{zone}"), "operationType": op_type,
                "targetLink": self._link(f"zones/{zone}/instances/{target}"),
                "status": "RUNNING", "progress": 0, "insertTime": _rfc3339(),
                "selfLink": self._link(f"zones/{zone}/operations/{name}")}
        if request_id:
            data["clientOperationId"] = request_id
            self._request_ids[request_id] = name
        fault = self._take(op_type)
        op = _Operation(data, self.op_steps, apply, fault.error if fault else None)
        self._ops[name] = op
        if self.op_steps == 0:
            self._advance(op)
        return data

    def _advance(self, op: _Operation) -> None:
        if op.data["status"] == "DONE":
            return
        op.steps -= 1
        if op.steps > 0:
            return
        if op.error is None:
            op.apply()
        else:
            code, message, status = op.error
            op.data.update(error={"errors": [{"code": code, "message": message}]},
                           httpErrorStatusCode=status,
                           httpErrorMessage={403: "FORBIDDEN", 400: "BAD REQUEST"}.get(
                               status, "ERROR"))
            if op.data["operationType"] == "insert":  # a failed create leaves nothing
                target = op.data["targetLink"].rsplit("/", 1)[-1]
                zone = op.data["zone"].rsplit("/", 1)[-1]
                self.instances.pop((zone, target), None)
        op.data.update(status="DONE", progress=100, endTime=_rfc3339())

    # -- routes -------------------------------------------------------------------------------
    def route(self, method: str, path: str, query: dict[str, str],
              body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Serve one call; returns (route name, JSON answer) or raises GceError."""
        if path == f"/v3/projects/{self.project}/timeSeries" and method == "GET":
            return "timeSeries.list", self._time_series(query)
        prefix = f"/compute/v1/projects/{self.project}/"
        if not path.startswith(prefix):
            raise GceError(404, "notFound", f"The resource '{path}' was not found")
        parts = path[len(prefix):].split("/")
        with self._lock:
            if parts[0] == "regions" and len(parts) == 2 and method == "GET":
                return "regions.get", self._region(parts[1])
            if parts[0] != "zones" or len(parts) < 2:
                raise GceError(404, "notFound", f"The resource '{path}' was not found")
            zone = parts[1]
            self._zone(zone)
            rest = parts[2:]
            if not rest and method == "GET":
                return "zones.get", {"kind": "compute#zone", "name": zone, "status": "UP",
                                     "region": self._link(f"regions/{zone.rsplit('-', 1)[0]}")}
            if rest == ["machineTypes"] and method == "GET":
                items = [{"kind": "compute#machineType", "name": n, "guestCpus": c,
                          "memoryMb": m, "zone": zone} for n, c, m in MACHINE_TYPES]
                return "machineTypes.list", self._page(items, query)
            if rest[:1] == ["machineTypes"] and len(rest) == 2 and method == "GET":
                return "machineTypes.get", self._machine_type(zone, rest[1])
            if rest[:1] == ["operations"] and len(rest) >= 2:
                op = self._ops.get(rest[1])
                if op is None:
                    raise GceError(404, "notFound", f"The resource '{path}' was not found")
                self._advance(op)
                return ("operations.wait" if rest[2:] == ["wait"] else "operations.get"), op.data
            if rest == ["instances"] and method == "GET":
                return "instances.list", self._page(self._listed(zone, query), query)
            if rest == ["instances"] and method == "POST":
                return "insert", self._insert(zone, body, query.get("requestId"))
            if rest[:1] == ["instances"] and len(rest) == 2:
                if method == "GET":
                    return "instances.get", self._get(zone, rest[1])
                if method == "DELETE":
                    return "delete", self._act(zone, rest[1], "delete", query)
            if rest[:1] == ["instances"] and len(rest) == 3 and method == "POST":
                action = rest[2]
                if action == "setLabels":
                    return action, self._set_labels(zone, rest[1], body, query)
                if action == "setDiskAutoDelete":
                    return action, self._auto_delete(zone, rest[1], query)
                if action in _TRANSITIONS:
                    return action, self._act(zone, rest[1], action, query)
        raise GceError(400, "badRequest", f"{method} {path} is not supported by the fake")

    def _time_series(self, query: dict[str, str]) -> dict[str, Any]:
        """Cloud Monitoring's timeSeries.list: one point per metric put in ``metrics``."""
        filter_ = query.get("filter", "")
        name = re.search(r'metric\.labels\.instance_name = "([^"]+)"', filter_)
        if name is None or "interval.endTime" not in query:
            raise GceError(400, "badRequest", "filter on instance_name and an interval needed")
        wanted = set(re.findall(r'"(compute\.googleapis\.com/[^"]+)"', filter_))
        series = [{"metric": {"type": metric, "labels": {"instance_name": name[1]}},
                   "resource": {"type": "gce_instance"}, "metricKind": "DELTA",
                   "points": [{"interval": {"endTime": query["interval.endTime"]},
                               "value": {"doubleValue": value} if metric.endswith("usage_time")
                               else {"int64Value": str(int(value))}}]}
                  for metric, value in self.metrics.get(name[1], {}).items() if metric in wanted]
        return {"timeSeries": series} if series else {}

    def _machine_type(self, zone: str, name: str) -> dict[str, Any]:
        for n, c, m in MACHINE_TYPES:
            if n == name:
                return {"kind": "compute#machineType", "name": n, "guestCpus": c,
                        "memoryMb": m, "zone": zone}
        raise GceError(404, "notFound", f"The resource 'projects/{self.project}/zones/{zone}/"
                                        f"machineTypes/{name}' was not found")

    def _region(self, region: str) -> dict[str, Any]:
        if not any(z.startswith(region + "-") for z in self.zones):
            raise GceError(404, "notFound", f"The resource 'projects/{self.project}/regions/"
                                            f"{region}' was not found")
        cpus = {n: c for n, c, _ in MACHINE_TYPES}
        used = dict.fromkeys(self.cpu_quotas, 0.0)
        for (zone, _), instance in self.instances.items():
            if zone.startswith(region) and instance["status"] not in ("TERMINATED", "SUSPENDED"):
                machine = instance["machineType"].rsplit("/", 1)[-1]
                own = f"{machine.split('-')[0].upper()}_CPUS"
                used[own if own in used else "CPUS"] += cpus.get(machine, 0)
        return {"kind": "compute#region", "name": region, "quotas": [
            *({"metric": m, "limit": limit, "usage": used[m]}
              for m, limit in self.cpu_quotas.items()),
            {"metric": "INSTANCES", "limit": 1000.0, "usage": 0.0}]}

    def _listed(self, zone: str, query: dict[str, str]) -> list[dict[str, Any]]:
        wanted = dict(re.findall(r'labels\.([\w-]+)\s*=\s*"([^"]*)"', query.get("filter", "")))
        return [i for (z, _), i in sorted(self.instances.items()) if z == zone
                and all(i["labels"].get(k) == v for k, v in wanted.items())]

    def _page(self, items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
        size = min(int(query.get("maxResults", self.max_page)), self.max_page)
        start = int(base64.b64decode(query["pageToken"])) if query.get("pageToken") else 0
        answer: dict[str, Any] = {"items": items[start:start + size]}
        if start + size < len(items):
            answer["nextPageToken"] = base64.b64encode(str(start + size).encode()).decode()
        return answer

    def _insert(self, zone: str, body: dict[str, Any], request_id: str | None) -> dict[str, Any]:
        name = str(body.get("name", ""))
        if request_id and request_id in self._request_ids:
            return self._ops[self._request_ids[request_id]].data
        if (zone, name) in self.instances:
            raise GceError(409, "alreadyExists", f"The resource 'projects/{self.project}/zones/"
                                                 f"{zone}/instances/{name}' already exists")
        machine = str(body.get("machineType", "")).rsplit("/", 1)[-1]
        if machine not in {n for n, _, _ in MACHINE_TYPES}:
            raise GceError(400, "invalid", f"Invalid value for field 'resource.machineType': "
                                           f"'{body.get('machineType')}'. Machine type with name "
                                           f"'{machine}' does not exist in zone '{zone}'.")
        disks = [{"deviceName": "persistent-disk-0", "boot": True, "autoDelete": True,
                  "source": self._link(f"zones/{zone}/disks/{name}")}]
        self.instances[(zone, name)] = self._instance(zone, name, dict(body.get("labels", {})),
                                                      machine, "PROVISIONING", disks)
        return self._operation(zone, "insert", name, request_id,
                               lambda: self._settle(zone, name, "RUNNING"))

    def _act(self, zone: str, name: str, action: str, query: dict[str, str]) -> dict[str, Any]:
        instance = self._get(zone, name)
        running, done = _TRANSITIONS[action]
        if action in ("suspend", "reset") and instance["status"] != "RUNNING":
            raise GceError(400, "resourceNotReady", f"The resource '{name}' is not ready")
        if action == "resume" and instance["status"] != "SUSPENDED":
            raise GceError(400, "resourceNotReady", f"The resource '{name}' is not suspended")
        if action == "start" and instance["status"] == "RUNNING":
            running = "RUNNING"
        instance["status"] = running

        def apply() -> None:
            if done is None:
                self.instances.pop((zone, name), None)
            else:
                self._settle(zone, name, done)

        return self._operation(zone, action, name, query.get("requestId"), apply)

    def _settle(self, zone: str, name: str, status: str) -> None:
        instance = self.instances.get((zone, name))
        if instance is not None:
            if status == "RUNNING" and instance["status"] != "RUNNING":
                instance["lastStartTimestamp"] = _rfc3339()
            instance["status"] = status

    def _set_labels(self, zone: str, name: str, body: dict[str, Any],
                    query: dict[str, str]) -> dict[str, Any]:
        instance = self._get(zone, name)
        if body.get("labelFingerprint") != instance["labelFingerprint"]:
            raise GceError(412, "conditionNotMet", "Labels fingerprint either invalid or "
                                                   "resource labels have changed")
        labels = dict(body.get("labels", {}))

        def apply() -> None:
            instance.update(labels=labels, labelFingerprint=uuid.uuid4().hex[:12])

        return self._operation(zone, "setLabels", name, query.get("requestId"), apply)

    def _auto_delete(self, zone: str, name: str, query: dict[str, str]) -> dict[str, Any]:
        instance = self._get(zone, name)
        disk = next((d for d in instance["disks"] if d["deviceName"] == query.get("deviceName")),
                    None)
        if disk is None:
            raise GceError(400, "invalid", f"No disk {query.get('deviceName')} on {name}")
        auto = query.get("autoDelete", "true") == "true"
        return self._operation(zone, "setDiskAutoDelete", name, query.get("requestId"),
                               lambda: disk.update(autoDelete=auto))

    # -- HTTP ---------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no delayed-ACK stall between headers and body

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def do_DELETE(self) -> None:
                self._serve()

            def _serve(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    self._check_auth()
                    if fake._take("throttle") is not None:
                        raise GceError(429, "rateLimitExceeded", "Rate Limit Exceeded")
                    name, answer = fake.route(self.command, url.path, query,
                                              json.loads(raw) if raw else {})
                    with fake._lock:
                        fake.calls[name] += 1
                    delay = fake._take("delay", name)
                    if delay is not None:
                        time.sleep(delay.seconds)
                    self._reply(200, answer)
                except GceError as err:
                    self._reply(err.status, {"error": {
                        "code": err.status, "message": err.message,
                        "errors": [{"message": err.message, "domain": "global",
                                    "reason": err.reason}],
                        "details": [{"@type": "type.googleapis.com/google.rpc.RequestInfo",
                                     "requestId": uuid.uuid4().hex}]}})

            def _check_auth(self) -> None:
                if fake.tokens is None:
                    return
                header = self.headers.get("Authorization", "")
                if not header.startswith("Bearer ") or header[7:] not in fake.tokens:
                    raise GceError(401, "authError", "Request had invalid authentication "
                                                     "credentials. Expected OAuth 2 access token")

            def _reply(self, status: int, answer: dict[str, Any]) -> None:
                body = json.dumps(answer).encode()
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=UTF-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        return Handler


def _rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@contextlib.contextmanager
def gce_fake(**kwargs: Any) -> Iterator[GceFake]:
    """A running :class:`GceFake`, stopped afterwards."""
    fake = GceFake(**kwargs)
    try:
        yield fake
    finally:
        fake.close()
