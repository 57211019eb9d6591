"""The HTTP API over real Ray Serve: a VM's life, bad input, health, metrics."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

API = "/api/v1"


def wait_state(http: httpx.Client, vm_id: str, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = http.get(f"{API}/vms/{vm_id}")
        if state == "deleted" and r.status_code == 404:
            return {}
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if body["state"] == state and body["pending"] is None:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def test_a_vm_lives_and_dies_over_http(http: httpx.Client) -> None:
    r = http.post(f"{API}/vms", json={"name": "e2e-web", "cpus": 1, "memory_mib": 64})
    assert r.status_code == 202, r.text
    vm = r.json()
    running = wait_state(http, vm["id"], "running")
    assert running["host"] in ("e1", "e2")
    assert running["guest_id"]
    assert http.post(f"{API}/vms/{vm['id']}/stop").status_code == 202
    wait_state(http, vm["id"], "stopped")
    assert http.post(f"{API}/vms/{vm['id']}/start").status_code == 202
    wait_state(http, vm["id"], "running")
    assert http.delete(f"{API}/vms/{vm['id']}").status_code == 202
    wait_state(http, vm["id"], "deleted")
    assert http.get(f"{API}/vms/{vm['id']}").status_code == 404
    assert http.post(f"{API}/vms/{vm['id']}/start").status_code == 404


def _inventory(http: httpx.Client) -> tuple[Any, Any]:
    """Every VM and host record (the audit trail aside, what a refusal must not change)."""
    return (http.get(f"{API}/vms", params={"limit": 1000}).json()["items"],
            http.get(f"{API}/hosts").json()["items"])


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/vms", b"{oops", 422),
    ("POST", "/vms", {"name": "n", "cpus": 0, "memory_mib": 64}, 422),
    ("POST", "/vms", {"name": "n", "cpus": 1}, 422),
    ("POST", "/vms", {"name": "n", "cpus": 900, "memory_mib": 64}, 409),
    ("POST", "/vms", {"name": "n", "cpus": 1, "memory_mib": 64, "host": "nowhere"}, 404),
    ("GET", "/vms/vm-unknown", None, 404),
    ("DELETE", "/vms/vm-unknown", None, 404),
    ("GET", "/vms?limit=-5", None, 422),
    ("POST", "/hosts", {"name": "e1", "driver": "sim"}, 409),
    ("GET", "/hosts/unknown", None, 404),
])
def test_bad_input_is_refused_and_changes_nothing(http: httpx.Client, method: str, path: str,
                                                  body: Any, status: int) -> None:
    before = _inventory(http)
    kwargs: dict[str, Any] = {"content": body, "headers": {"content-type": "application/json"}} \
        if isinstance(body, bytes) else ({"json": body} if body is not None else {})
    r = http.request(method, API + path, **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert _inventory(http) == before


def test_duplicate_name_and_invalid_transition(http: httpx.Client) -> None:
    vm = http.post(f"{API}/vms", json={"name": "e2e-dup", "cpus": 1, "memory_mib": 64,
                                       "start": False}).json()
    wait_state(http, vm["id"], "stopped")
    r = http.post(f"{API}/vms", json={"name": "e2e-dup", "cpus": 1, "memory_mib": 64})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "already_exists")
    r = http.post(f"{API}/vms/{vm['id']}/pause")
    assert (r.status_code, r.json()["error"]["code"]) == (409, "invalid_transition")
    http.delete(f"{API}/vms/{vm['id']}")
    wait_state(http, vm["id"], "deleted")


def test_health_metrics_docs_and_lists(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/docs").status_code == 200
    assert "/api/v1/vms" in http.get("/openapi.json").json()["paths"]
    hosts = http.get(f"{API}/hosts", params={"sort": "name"}).json()
    assert [h["name"] for h in hosts["items"]] == ["e1", "e2"]
    metrics = http.get("/metrics").text
    assert 'novacron_host_capacity{host="e2",resource="cpus"}' in metrics
    assert "novacron_vms{" in metrics
    assert "novacron_api_request_seconds_bucket" in metrics
