"""moto in server mode on 127.0.0.1, behind a small proxy that adds what real EC2 does and moto
does not, so boto3's real code paths (signing, retries, waiters, paging) run against it.

The proxy forwards every request to moto and can, for EC2 query-protocol actions:

* answer throttled (``RequestLimitExceeded``, HTTP 503) for the next N calls (:meth:`throttle`),
* answer with any EC2 error instead of calling moto (:meth:`fail`: quota, capacity...),
* hold a response past the client's read timeout after moto has executed it (:meth:`delay`),
* refuse revoked access keys with ``AuthFailure`` (:meth:`revoke`),
* answer Service Quotas for EC2 quota codes (moto knows only VPC's): the values set with
  :meth:`set_quota`, NoSuchResourceException for the rest,
* honour RunInstances' ClientToken as EC2 does: a repeated token returns the first response
  (moto ignores the token and would launch a second instance),
* apply RegisterImage's image TagSpecifications as EC2 does (moto registers the AMI untagged).

It counts the calls per action (:attr:`FaultProxy.calls`; a REST call counts as ``"PUT snapshots"``
and the like). Known moto behaviour: the first EC2
call of a process takes about a second (the fixture warms it once), instances change state at
once, DescribeInstances pages count reservations, and CloudWatch holds no EC2 metrics until some
are put.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

_ACCESS_KEY = re.compile(r"Credential=([^/]+)/")


@dataclass
class _Fault:
    action: str | None  # None: any EC2 action
    remaining: int
    status: int = 400
    code: str = ""
    message: str = ""
    delay_s: float = 0.0


def ec2_error(code: str, message: str) -> bytes:
    """An EC2 query-protocol error document."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error><Code>{code}'
            f"</Code><Message>{message}</Message></Error></Errors>"
            f"<RequestID>{uuid.uuid4()}</RequestID></Response>").encode()


class FaultProxy:
    """The proxy (see the module docstring); ``url`` is what boto3's endpoint_url points at."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.calls: Counter[str] = Counter()
        self._faults: list[_Fault] = []
        self._revoked: set[str] = set()
        self._tokens: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        self._quotas: dict[str, float] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        """Forget faults, revoked keys and counts (tokens stay, as in EC2)."""
        with self._lock:
            self._faults.clear()
            self._revoked.clear()
            self._quotas.clear()
            self.calls.clear()

    def throttle(self, count: int, action: str | None = None) -> None:
        """Answer the next ``count`` EC2 calls (of ``action``) with RequestLimitExceeded."""
        self.fail(action, "RequestLimitExceeded", "Request limit exceeded.", status=503,
                  count=count)

    def fail(self, action: str | None, code: str, message: str, *, status: int = 400,
             count: int = 1) -> None:
        """Answer the next ``count`` calls of ``action`` with an EC2 error."""
        with self._lock:
            self._faults.append(_Fault(action, count, status, code, message))

    def delay(self, action: str, seconds: float, count: int = 1) -> None:
        """Execute the next ``count`` calls of ``action``, but answer only after ``seconds``."""
        with self._lock:
            self._faults.append(_Fault(action, count, delay_s=seconds))

    def revoke(self, access_key_id: str) -> None:
        """Refuse requests signed with ``access_key_id`` (AuthFailure)."""
        with self._lock:
            self._revoked.add(access_key_id)

    def set_quota(self, quota_code: str, value: float) -> None:
        """Make Service Quotas report ``value`` for the EC2 quota ``quota_code``."""
        with self._lock:
            self._quotas[quota_code] = value

    def _quota(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        request = json.loads(body or b"{}")
        with self._lock:
            value = self._quotas.get(request.get("QuotaCode", ""))
        headers = [("Content-Type", "application/x-amz-json-1.1"),
                   ("x-amzn-RequestId", str(uuid.uuid4()))]
        if value is None:
            return 400, headers, json.dumps({
                "__type": "NoSuchResourceException",
                "message": "The request failed because the specified resource does not exist."
            }).encode()
        return 200, headers, json.dumps({"Quota": {
            "ServiceCode": "ec2", "QuotaCode": request["QuotaCode"], "Value": value,
            "QuotaName": "Running On-Demand Standard instances", "Unit": "None"}}).encode()

    def _take(self, action: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.action in (None, action):
                    fault.remaining -= 1
                    return fault
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # no delayed-ACK stall between headers and body

            def log_message(self, format: str, *args: object) -> None:
                """Quiet."""

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def do_PUT(self) -> None:
                self._serve()

            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                form = parse_qs(body.decode("latin-1")) if body and b"Action=" in body else {}
                action = form.get("Action", [""])[0]
                target = self.headers.get("X-Amz-Target", "")
                resource = urlsplit(self.path).path.strip("/").split("/")[0]
                name = action or target.rsplit(".", 1)[-1] or f"{self.command} {resource}"
                with proxy._lock:
                    proxy.calls[name] += 1
                key = _ACCESS_KEY.search(self.headers.get("Authorization", ""))
                if key and key.group(1) in proxy._revoked:
                    self._reply(401, [("Content-Type", "text/xml")], ec2_error(
                        "AuthFailure", "AWS was not able to validate the provided access "
                        "credentials"))
                    return
                fault = proxy._take(action) if action else None
                if fault is not None and fault.code:
                    self._reply(fault.status, [("Content-Type", "text/xml")],
                                ec2_error(fault.code, fault.message))
                    return
                if target.startswith("ServiceQuotas") and json.loads(body or b"{}").get(
                        "ServiceCode") == "ec2":
                    self._reply(*proxy._quota(body))
                    return
                token = form.get("ClientToken", [""])[0] if action == "RunInstances" else ""
                with proxy._lock:
                    replay = proxy._tokens.get(token) if token else None
                status, headers, payload = replay or self._forward(body)
                if token and status == 200:
                    with proxy._lock:
                        proxy._tokens.setdefault(token, (status, headers, payload))
                if action == "RegisterImage" and status == 200:
                    self._tag_image(form, payload)
                if fault is not None:
                    time.sleep(fault.delay_s)
                self._reply(status, headers, payload)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                up = proxy.upstream
                if not hasattr(self, "upstream"):  # one moto connection per client connection
                    self.upstream = http.client.HTTPConnection(up.hostname or "127.0.0.1",
                                                               up.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()  # length: from the body
                           if k.lower() not in ("connection", "keep-alive", "content-length")}
                try:
                    self.upstream.request(self.command, self.path, body=body, headers=headers)
                    response = self.upstream.getresponse()
                    payload = response.read()
                except (OSError, http.client.HTTPException):
                    self.upstream.close()
                    raise
                kept = [(k, v) for k, v in response.getheaders()
                        if k.lower() not in ("connection", "transfer-encoding",
                                             "content-length", "keep-alive")]
                return response.status, kept, payload

            def _tag_image(self, form: dict[str, list[str]], payload: bytes) -> None:
                """Tag a registered AMI with the request's image TagSpecifications."""
                image = re.search(rb"<imageId>([^<]+)</imageId>", payload)
                specs = [k.split(".")[1] for k, v in form.items()
                         if re.fullmatch(r"TagSpecification\.\d+\.ResourceType", k)
                         and v == ["image"]]
                keys = sorted(k for n in specs for k in form
                              if k.startswith(f"TagSpecification.{n}.Tag.") and k.endswith(".Key"))
                if image is None or not keys:
                    return
                create = {"Action": "CreateTags", "Version": form.get("Version", [""])[0],
                          "ResourceId.1": image.group(1).decode()}
                for i, key in enumerate(keys, 1):
                    create[f"Tag.{i}.Key"] = form[key][0]
                    create[f"Tag.{i}.Value"] = form.get(key[:-len("Key")] + "Value", [""])[0]
                self._forward(urlencode(create).encode())

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    for key, value in headers:
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

        return Handler


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode, a separate process on 127.0.0.1 validating instance types as EC2 does;
    yields its URL once it answers (warmed: its first EC2 call takes about a second)."""
    import boto3

    with socket.socket() as probe:  # a free port for moto to bind
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=url,
                           aws_access_key_id="warm", aws_secret_access_key="warm")
        deadline = time.monotonic() + 30
        while True:
            try:
                ec2.describe_regions()
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on {url}") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
