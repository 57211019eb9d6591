"""A local HTTPS fake of the ARM compute endpoints the Azure driver uses.

Served over TLS with a self-signed certificate made here (the client gets its path as
``connection_verify``), so azure-core's real bearer-token policy stays in the path. Like ARM it
requires ``api-version`` and a bearer token, pages lists with a ``nextLink`` that carries the
``api-version``, runs PUT/PATCH/DELETE and the power actions as long-running operations polled at
``Azure-AsyncOperation`` (with a ``Location`` too), answers errors as
``{"error": {"code", "message"}}`` with an ``x-ms-request-id``, honours ``If-Match`` /
``If-None-Match: *``, moves VMs through provisioning and power states, reports the location's
vCPU usage (``cores``: the cores of its VMs not deallocated) against ``core_quota``, and serves
Azure Monitor metrics of a VM (the values a test puts in ``metrics``).

Test controls: :meth:`ArmFake.throttle` (429 TooManyRequests with Retry-After for the next N
calls), :meth:`ArmFake.fail` (the next call of a route answers an error, or with ``late=True``
its operation fails, leaving a Failed VM as ARM does), :meth:`ArmFake.delay` (execute, answer
late), ``tokens`` (bearer tokens accepted) and ``calls`` (a count per route).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import itertools
import json
import re
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

VM_SIZES = [  # name, cores, memory MiB (a slice of the real catalogue)
    ("Standard_B1ls", 1, 512), ("Standard_B1s", 1, 1024), ("Standard_B2s", 2, 4096),
    ("Standard_D2s_v5", 2, 8192), ("Standard_D4s_v5", 4, 16384), ("Standard_E2s_v5", 2, 16384),
    ("Standard_F4s_v2", 4, 8192), ("Standard_D16s_v5", 16, 65536),
]
_PROVIDER = "providers/Microsoft.Compute"
_GRAINS = {"PT1M", "PT5M", "PT15M", "PT30M", "PT1H", "PT6H", "PT12H", "P1D"}
_ACTIONS = {  # POST action -> (power state while it runs, when done)
    "start": ("starting", "running"), "powerOff": ("stopping", "stopped"),
    "deallocate": ("deallocating", "deallocated"), "restart": ("running", "running"),
}


class ArmError(Exception):
    """An error answered in ARM's shape."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


@dataclass
class _Fault:
    kind: str  # "throttle" | "delay" | "fail"
    remaining: int
    route: str | None = None
    seconds: float = 0.0
    error: tuple[int, str, str] | None = None
    late: bool = False


@dataclass
class _Operation:
    steps: int
    apply: Callable[[], None]
    error: tuple[str, str] | None = None
    status: str = "InProgress"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "arm-cert.pem", directory / "arm-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class ArmFake:
    """The fake (see the module docstring). ``url`` is the client's ``base_url``."""

    def __init__(self, cert_dir: Path, subscription: str = "00000000-0000-0000-0000-00000000cafe",
                 locations: tuple[str, ...] = ("westeurope", "eastus"),
                 resource_groups: tuple[str, ...] = ("novacron-rg",), op_steps: int = 2,
                 page_size: int = 100, core_quota: int = 20) -> None:
        self.subscription, self.locations = subscription, locations
        self.resource_groups, self.op_steps = resource_groups, op_steps
        self.page_size = page_size
        self.core_quota = self._core_quota = core_quota
        self.tokens: set[str] = {"arm-token"}
        self.calls: Counter[str] = Counter()
        self.vms: dict[tuple[str, str], dict[str, Any]] = {}  # (group, name) -> VM
        self.deleted: dict[tuple[str, str], dict[str, Any]] = {}  # as they were when deleted
        self.metrics: dict[tuple[str, str], dict[str, float]] = {}  # Azure Monitor, per VM
        self._ops: dict[str, _Operation] = {}
        self._creating: dict[tuple[str, str], Callable[[], None]] = {}
        self._faults: list[_Fault] = []
        self._etags = itertools.count(1)
        self._lock = threading.RLock()
        self.cert, key = self_signed_certificate(cert_dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, key)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """Forget faults, counts and a changed ``core_quota``; accept the default token again
        (VMs stay)."""
        with self._lock:
            self._faults.clear()
            self.tokens = {"arm-token"}
            self.calls.clear()
            self.core_quota = self._core_quota

    # -- test controls ------------------------------------------------------------------------
    def throttle(self, count: int, retry_after: int = 0) -> None:
        """Answer the next ``count`` calls with 429, ``Retry-After: retry_after``."""
        with self._lock:
            self._faults.append(_Fault("throttle", count, seconds=retry_after))

    def fail(self, route: str, status: int, code: str, message: str, *,
             late: bool = False, count: int = 1) -> None:
        """The next ``count`` ``route`` calls answer ``code``, or (``late``) their operations
        fail."""
        with self._lock:
            self._faults.append(_Fault("fail", count, route, error=(status, code, message),
                                       late=late))

    def delay(self, route: str, seconds: float, count: int = 1) -> None:
        """Execute the next ``count`` calls of ``route``, answering after ``seconds``."""
        with self._lock:
            self._faults.append(_Fault("delay", count, route, seconds=seconds))

    def add_vm(self, group: str, name: str, tags: dict[str, str],
               location: str = "westeurope") -> None:
        """Create a running VM directly (set-up of large lists)."""
        with self._lock:
            self.vms[(group, name)] = self._vm(group, name, location, tags, "Standard_B1s",
                                               "Succeeded", "running")

    def _late_fault(self, route: str) -> _Fault | None:
        """The failure set for ``route``: raised now, or returned for its operation (late)."""
        fault = self._take("fail", route)
        if fault is not None and fault.error is not None and not fault.late:
            raise ArmError(*fault.error)
        return fault

    def _take(self, kind: str, route: str | None = None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.kind == kind and fault.route in (None, route):
                    fault.remaining -= 1
                    return fault
        return None

    # -- resources ----------------------------------------------------------------------------
    def _vm_id(self, group: str, name: str) -> str:
        return (f"/subscriptions/{self.subscription}/resourceGroups/{group}/{_PROVIDER}/"
                f"virtualMachines/{name}")

    def _vm(self, group: str, name: str, location: str, tags: dict[str, str], size: str,
            provisioning: str, power: str | None) -> dict[str, Any]:
        return {"id": self._vm_id(group, name), "name": name, "location": location,
                "type": "Microsoft.Compute/virtualMachines", "tags": tags,
                "etag": f'"{next(self._etags)}"',
                "properties": {"vmId": str(uuid.uuid4()), "provisioningState": provisioning,
                               "hardwareProfile": {"vmSize": size}, "power": power,
                               "timeCreated": _now()}}

    def _view(self, vm: dict[str, Any], expand: bool) -> dict[str, Any]:
        shown: dict[str, Any] = json.loads(json.dumps(vm))
        power = shown["properties"].pop("power")
        if expand:
            statuses = [{"code": f"ProvisioningState/{vm['properties']['provisioningState']}"
                        .lower(), "level": "Info"}]
            if power:
                statuses.append({"code": f"PowerState/{power}", "level": "Info",
                                 "time": vm["properties"].get("lastStart", _now())})
            shown["properties"]["instanceView"] = {"statuses": statuses}
        return shown

    def _get_vm(self, group: str, name: str) -> dict[str, Any]:
        vm = self.vms.get((group, name))
        if vm is None:
            raise ArmError(404, "ResourceNotFound", f"The Resource 'Microsoft.Compute/"
                           f"virtualMachines/{name}' under resource group '{group}' was not "
                           "found.")
        return vm

    def _operation(self, location: str, apply: Callable[[], None],
                   late: _Fault | None) -> dict[str, str]:
        op_id = str(uuid.uuid4())
        error = (late.error[1], late.error[2]) if late and late.error else None
        self._ops[op_id] = _Operation(self.op_steps, apply, error)
        status_url = (f"{self.url}/subscriptions/{self.subscription}/{_PROVIDER}/locations/"
                      f"{location}/operations/{op_id}?api-version=2026-04-01")
        return {"Azure-AsyncOperation": status_url, "Location": status_url + "&monitor=true"}

    def _advance(self, op_id: str) -> _Operation:
        op = self._ops.get(op_id)
        if op is None:
            raise ArmError(404, "NotFound", f"operation {op_id} not found")
        if op.status == "InProgress":
            op.steps -= 1
            if op.steps <= 0:
                op.apply()
                op.status = "Failed" if op.error else "Succeeded"
        return op

    # -- routes -------------------------------------------------------------------------------
    def route(self, method: str, path: str, query: dict[str, str], headers: dict[str, str],
              body: dict[str, Any]) -> tuple[str, int, dict[str, Any], dict[str, str]]:
        """Serve one call: (route name, status, JSON answer, extra headers), or ArmError."""
        sub = f"/subscriptions/{self.subscription}/"
        if not path.startswith(sub):
            raise ArmError(404, "SubscriptionNotFound", f"The subscription in {path} could "
                                                        "not be found.")
        rest = path[len(sub):]
        if m := re.fullmatch(rf"{_PROVIDER}/locations/([^/]+)/(vmSizes|usages)", rest):
            self._location(m[1])
            if m[2] == "vmSizes":
                return "vmSizes", 200, {"value": [
                    {"name": n, "numberOfCores": c, "memoryInMB": mem, "maxDataDiskCount": 4,
                     "osDiskSizeInMB": 1047552, "resourceDiskSizeInMB": 0}
                    for n, c, mem in VM_SIZES]}, {}
            return "usages", 200, {"value": [{"unit": "Count",
                                              "currentValue": self._cores_used(m[1]),
                                              "limit": self.core_quota,
                                              "name": {"value": "cores", "localizedValue":
                                                       "Total Regional vCPUs"}}]}, {}
        if m := re.fullmatch(rf"{_PROVIDER}/locations/([^/]+)/operations/([^/]+)", rest):
            op = self._advance(m[2])
            answer: dict[str, Any] = {"name": m[2], "status": op.status,
                                      "startTime": _now()}
            if op.error:
                answer["error"] = {"code": op.error[0], "message": op.error[1]}
            if "monitor" in query:
                return "operations", 202 if op.status == "InProgress" else 200, answer, {}
            return "operations", 200, answer, {}
        if rest == f"{_PROVIDER}/virtualMachines" and method == "GET":
            if query.get("statusOnly") != "true":
                raise ArmError(400, "InvalidParameter", "this fake lists all VMs statusOnly")
            return "listAll", 200, self._page([self._view(v, True) for _, v in
                                               sorted(self.vms.items())], path, query), {}
        if m := re.fullmatch(rf"resourceGroups/([^/]+)/{_PROVIDER}/virtualMachines/([^/]+)/"
                             r"providers/Microsoft\.Insights/metrics", rest):
            return "metrics", 200, self._metrics(m[1], m[2], query), {}
        m = re.fullmatch(rf"resourceGroups/([^/]+)/{_PROVIDER}/virtualMachines(?:/([^/]+))?"
                         r"(?:/(\w+))?", rest)
        if m is None:
            raise ArmError(400, "InvalidRequestUri", f"{method} {path} is not served here")
        group, name, action = m[1], m[2], m[3]
        if group not in self.resource_groups:
            raise ArmError(404, "ResourceGroupNotFound",
                           f"Resource group '{group}' could not be found.")
        if name is None:
            items = [self._view(v, False) for (g, _), v in sorted(self.vms.items()) if g == group]
            return "list", 200, self._page(items, path, query), {}
        if action:
            return self._action(group, name, action, query)
        if method == "GET":
            return "get", 200, self._view(self._get_vm(group, name),
                                          query.get("$expand") == "instanceView"), {}
        if method == "PUT":
            return self._put(group, name, headers, body)
        if method == "PATCH":
            vm = self._get_vm(group, name)
            self._check_etag(vm, headers)
            late = self._late_fault("update")

            def patch() -> None:
                vm["tags"] = body.get("tags", vm["tags"])
                _merge(vm["properties"], body.get("properties", {}))
                vm["etag"] = f'"{next(self._etags)}"'

            return "update", 200, self._view(vm, False), self._operation(vm["location"], patch,
                                                                           late)
        if method == "DELETE":
            vm = self._get_vm(group, name)
            late = self._late_fault("delete")
            vm["properties"]["provisioningState"] = "Deleting"

            def remove() -> None:
                self.deleted[(group, name)] = self.vms.pop((group, name))

            return "delete", 202, {}, self._operation(vm["location"], remove, late)
        raise ArmError(405, "MethodNotAllowed", f"{method} is not allowed on {path}")

    def _metrics(self, group: str, name: str, query: dict[str, str]) -> dict[str, Any]:
        """Azure Monitor's answer: one point per metric holding the value put in ``metrics``."""
        self._get_vm(group, name)
        if query.get("interval") not in _GRAINS or "/" not in query.get("timespan", ""):
            raise ArmError(400, "BadRequest", "interval and timespan are required")
        values = self.metrics.get((group, name), {})
        return {"timespan": query["timespan"], "interval": query["interval"], "value": [
            {"name": {"value": metric}, "unit": "Unspecified", "timeseries": [{"data": [
                {"timeStamp": _now(), "average": values[metric], "total": values[metric]}]}]}
            for metric in query.get("metricnames", "").split(",") if metric in values]}

    def _cores_used(self, location: str) -> int:
        """Cores of the location's VMs that hold them (not deallocated, not failed)."""
        cores = {n: c for n, c, _ in VM_SIZES}
        return sum(cores.get(vm["properties"]["hardwareProfile"]["vmSize"], 0)
                   for vm in self.vms.values() if vm["location"] == location
                   and vm["properties"]["power"] not in (None, "deallocated"))

    def _location(self, location: str) -> None:
        if location not in self.locations:
            raise ArmError(400, "NoRegisteredProviderFound",
                           f"No registered resource provider found for location '{location}' "
                           f"and API version '2026-04-01' for type 'virtualMachines'.")

    def _check_etag(self, vm: dict[str, Any], headers: dict[str, str]) -> None:
        if_match = headers.get("if-match")
        if if_match and if_match != vm["etag"]:
            raise ArmError(412, "PreconditionFailed", "The condition specified using HTTP "
                                                      "conditional header(s) is not met.")

    def _put(self, group: str, name: str, headers: dict[str, str],
             body: dict[str, Any]) -> tuple[str, int, dict[str, Any], dict[str, str]]:
        existing = self.vms.get((group, name))
        if existing is not None and headers.get("if-none-match") == "*":
            raise ArmError(412, "PreconditionFailed", "The condition specified using HTTP "
                                                      "conditional header(s) is not met.")
        if existing is not None:
            self._check_etag(existing, headers)
        location = str(body.get("location", ""))
        self._location(location)
        properties = body.get("properties", {})
        size = properties.get("hardwareProfile", {}).get("vmSize", "")
        if size not in {n for n, _, _ in VM_SIZES}:
            raise ArmError(400, "InvalidParameter", f"The value {size} provided for the VM size "
                           "is not valid. Query the available VM sizes of the location.")
        late = self._late_fault("put")
        if existing is not None:  # a repeat of the same definition: done when the VM is
            return "put", 200, self._view(existing, False), self._operation(
                location, lambda: self._provisioned(group, name), late)
        vm = self._vm(group, name, location, dict(body.get("tags", {})), size, "Creating",
                      "starting")
        vm["properties"].update({k: v for k, v in properties.items()
                                 if k != "hardwareProfile"})
        self.vms[(group, name)] = vm
        failed = late is not None and late.error is not None
        self._creating[(group, name)] = lambda: vm["properties"].update(
            provisioningState="Failed" if failed else "Succeeded",
            power=None if failed else "running", lastStart=_now())
        return "put", 201, self._view(vm, False), self._operation(
            location, lambda: self._provisioned(group, name), late)

    def _provisioned(self, group: str, name: str) -> None:
        """Finish creating a VM (once, whichever PUT's operation gets there first)."""
        finish = self._creating.pop((group, name), None)
        if finish is not None:
            finish()

    def _action(self, group: str, name: str, action: str,
                query: dict[str, str]) -> tuple[str, int, dict[str, Any], dict[str, str]]:
        vm = self._get_vm(group, name)
        if action not in _ACTIONS:
            raise ArmError(400, "InvalidRequestUri", f"no action {action}")
        late = self._late_fault(action)
        running, done = _ACTIONS[action]
        if action == "restart" and vm["properties"]["power"] != "running":
            raise ArmError(409, "OperationNotAllowed", f"Cannot restart VM {name}: it is not "
                                                       "running.")
        vm["properties"]["power"] = running

        def apply() -> None:
            if done == "running" and running != "running":
                vm["properties"]["lastStart"] = _now()
            vm["properties"]["power"] = done

        return action, 202, {}, self._operation(vm["location"], apply, late)

    def _page(self, items: list[dict[str, Any]], path: str,
              query: dict[str, str]) -> dict[str, Any]:
        start = int(query.get("$skiptoken", 0))
        answer: dict[str, Any] = {"value": items[start:start + self.page_size]}
        if start + self.page_size < len(items):
            kept = {k: v for k, v in query.items() if k != "$skiptoken"}
            answer["nextLink"] = (f"{self.url}{path}?"
                                  + urlencode({**kept, "$skiptoken": start + self.page_size}))
        return answer

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

            def do_PUT(self) -> None:
                self._serve()

            def do_PATCH(self) -> None:
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
                headers = {k.lower(): v for k, v in self.headers.items()}
                try:
                    if "api-version" not in query:
                        raise ArmError(400, "MissingApiVersionParameter",
                                       "The api-version query parameter (?api-version=) is "
                                       "required for all requests.")
                    auth = headers.get("authorization", "")
                    if not auth.startswith("Bearer ") or auth[7:] not in fake.tokens:
                        raise ArmError(401, "InvalidAuthenticationToken",
                                       "The access token is invalid.",
                                       {"WWW-Authenticate": 'Bearer error="invalid_token"'})
                    throttle = fake._take("throttle")
                    if throttle is not None:
                        raise ArmError(429, "TooManyRequests", "The request is being "
                                       "throttled.", {"Retry-After": str(int(throttle.seconds))})
                    with fake._lock:
                        name, status, answer, extra = fake.route(
                            self.command, url.path, query, headers,
                            json.loads(raw) if raw else {})
                        fake.calls[name] += 1
                    delay = fake._take("delay", name)
                    if delay is not None:
                        time.sleep(delay.seconds)
                    self._reply(status, answer, extra)
                except ArmError as err:
                    self._reply(err.status, {"error": {"code": err.code,
                                                       "message": err.message}}, err.headers)

            def _reply(self, status: int, answer: dict[str, Any],
                       extra: dict[str, str]) -> None:
                body = json.dumps(answer).encode() if answer or status != 202 else b""
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("x-ms-request-id", str(uuid.uuid4()))
                    for key, value in extra.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        return Handler


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """Merge a PATCH body into a resource, as ARM does (objects merged, the rest replaced)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


@contextlib.contextmanager
def arm_fake(cert_dir: Path, **kwargs: Any) -> Iterator[ArmFake]:
    """A running :class:`ArmFake`, stopped afterwards."""
    fake = ArmFake(cert_dir, **kwargs)
    try:
        yield fake
    finally:
        fake.close()
