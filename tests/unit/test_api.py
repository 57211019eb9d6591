"""The HTTP routes over an in-process control plane: lifecycle, listing and every bad input."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import Parameters, Type
from fastapi.testclient import TestClient

from novacron.auth import AuthServices
from novacron.controlplane import ControlPlane
from novacron.localfleet import LocalFleet
from novacron.model import HostCreate
from novacron.secured import SecuredPlane
from novacron.store import Store
from serve.api import build_app
from serve.backend import LocalBackend
from tests.conftest import sim_host_config
from tests.unit.test_controlplane import snapshot

API = "/api/v1"
CHEAP_KDF = Parameters(type=Type.ID, version=19, salt_len=16, hash_len=32, time_cost=1,
                       memory_cost=8, parallelism=1)  # argon2id, fast for tests


@pytest.fixture
def api(state_dir: Path) -> Iterator[tuple[TestClient, ControlPlane]]:
    store = Store(state_dir / "state.db")
    fleet = LocalFleet(state_dir, heartbeat_interval_s=0.2, stop_timeout_s=5)
    plane = ControlPlane(store, fleet, heartbeat_interval_s=0.2, heartbeat_misses=20)
    fleet.bind(plane)
    for name, cpus in (("h1", 2), ("h2", 4)):
        plane.register_host(HostCreate(name=name, driver="sim",
                                       config=sim_host_config(state_dir, cpus=cpus)))
    secured = SecuredPlane(plane, AuthServices.create(store, password_parameters=CHEAP_KDF))
    token = secured.auth.first_start()
    assert token is not None
    app = build_app()
    app.state.backend = LocalBackend(secured)
    with TestClient(app, raise_server_exceptions=False, headers={
            "Authorization": f"Bearer {token.get_secret_value()}"}) as client:
        yield client, plane
    fleet.close()
    store.close()


def wait_state(client: TestClient, vm_id: str, state: str, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = client.get(f"{API}/vms/{vm_id}")
        if state == "deleted" and r.status_code == 404:
            return {}
        body: dict[str, Any] = r.json()
        if body.get("state") == state and body.get("pending") is None:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_vm_lifecycle_over_http(api: tuple[TestClient, ControlPlane]) -> None:
    client, _ = api
    r = client.post(f"{API}/vms", json={"name": "web", "cpus": 1, "memory_mib": 64})
    assert r.status_code == 202, r.text
    vm = r.json()
    assert vm["state"] == "pending"
    assert vm["host"] in ("h1", "h2")
    assert wait_state(client, vm["id"], "running")["guest_id"]
    for action, settled in (("stop", "stopped"), ("start", "running"), ("pause", "paused"),
                            ("resume", "running"), ("reboot", "running")):
        r = client.post(f"{API}/vms/{vm['id']}/{action}")
        assert r.status_code == 202, r.text
        wait_state(client, vm["id"], settled)
    r = client.post(f"{API}/vms/{vm['id']}/stop", json={"force": True})
    assert r.status_code == 202
    wait_state(client, vm["id"], "stopped")
    assert client.delete(f"{API}/vms/{vm['id']}").status_code == 202
    wait_state(client, vm["id"], "deleted")
    events = client.get(f"{API}/events", params={"since": 0, "limit": 1000}).json()["items"]
    assert [e["op"] for e in events if e["key"] == vm["id"]][-1] == "delete"


def test_lists_filter_sort_and_page(api: tuple[TestClient, ControlPlane]) -> None:
    client, _ = api
    for i in range(7):
        r = client.post(f"{API}/vms", json={"name": f"vm{i}", "cpus": 1, "memory_mib": 16,
                                            "start": False, "host": "h2" if i % 2 else "h1"})
        assert r.status_code == 202
    names: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 3, "sort": "-name"}
        if cursor:
            params["cursor"] = cursor
        page = client.get(f"{API}/vms", params=params).json()
        names += [vm["name"] for vm in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert names == [f"vm{i}" for i in range(6, -1, -1)]
    on_h2 = client.get(f"{API}/vms", params={"host": "h2"}).json()["items"]
    assert sorted(vm["name"] for vm in on_h2) == ["vm1", "vm3", "vm5"]
    hosts = client.get(f"{API}/hosts", params={"sort": "-name"}).json()["items"]
    assert [h["name"] for h in hosts] == ["h2", "h1"]
    assert client.get(f"{API}/hosts/h1").json()["allocated"]["cpus"] == 4


def test_guest_counters_reach_prometheus(api: tuple[TestClient, ControlPlane]) -> None:
    client, _ = api
    vm = client.post(f"{API}/vms", json={"name": "busy", "cpus": 1, "memory_mib": 64,
                                         "workload": {"cpu_busy": 0.5}}).json()
    wait_state(client, vm["id"], "running")
    deadline = time.monotonic() + 15
    while True:
        lines = [line for line in client.get("/metrics").text.splitlines()
                 if line.startswith("novacron_vm_cpu_seconds{") and vm["id"] in line]
        if lines and float(lines[0].rsplit(" ", 1)[1]) > 0:
            break
        assert time.monotonic() < deadline, "no CPU time reported for the busy guest"
        time.sleep(0.2)
    assert f'novacron_vm_memory_touched_bytes{{host="{vm["host"]}",vm="{vm["id"]}"}}' in \
        client.get("/metrics").text


def test_provider_health_figures_reach_prometheus(api: tuple[TestClient, ControlPlane],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    client, plane = api
    sample = {"h1": {"cpu_load": 0.1, "guests": 3,  # a cloud host's: a count, no counters
                     "extra": {"credentials_valid": 1.0, "throttled_per_min": 2.0}}}
    monkeypatch.setattr(plane, "all_host_stats", lambda: sample)  # no live heartbeat races it
    text = client.get("/metrics").text
    assert 'novacron_host_health{figure="credentials_valid",host="h1"} 1.0' in text
    assert 'novacron_host_health{figure="throttled_per_min",host="h1"} 2.0' in text


def test_health_metrics_and_docs(api: tuple[TestClient, ControlPlane]) -> None:
    client, _ = api
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    client.post(f"{API}/vms", json={"name": "m", "cpus": 1, "memory_mib": 16, "start": False})
    client.get(f"{API}/vms")
    text = client.get("/metrics").text
    assert 'novacron_host_capacity{host="h1",resource="cpus"} 8.0' in text
    assert 'novacron_api_requests_total{method="GET",route="/api/v1/vms",status="200"}' in text
    assert "novacron_api_request_seconds_bucket" in text
    assert client.get("/openapi.json").json()["info"]["title"] == "NovaCron"


BAD: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/vms", b"{not json", 422, "invalid_request"),
    ("POST", "/vms", {"name": "x", "cpus": -1, "memory_mib": 64}, 422, "invalid_request"),
    ("POST", "/vms", {"name": "x", "memory_mib": 64}, 422, "invalid_request"),
    ("POST", "/vms", {"name": "x", "cpus": 1, "memory_mib": 0}, 422, "invalid_request"),
    ("POST", "/vms", {"name": "x", "cpus": 1, "memory_mib": 64, "color": "red"}, 422,
     "invalid_request"),
    ("POST", "/vms", {"name": "../../etc", "cpus": 1, "memory_mib": 64}, 422,
     "invalid_request"),
    ("POST", "/vms", {"name": "x", "cpus": "many", "memory_mib": 64}, 422, "invalid_request"),
    ("POST", "/vms", [1, 2, 3], 422, "invalid_request"),
    ("POST", "/vms", {"name": "x", "cpus": 100, "memory_mib": 64}, 409, "no_capacity"),
    ("POST", "/vms", {"name": "x", "cpus": 1, "memory_mib": 10_000_000}, 409, "no_capacity"),
    ("POST", "/vms", {"name": "x", "cpus": 1, "memory_mib": 64, "host": "ghost"}, 404,
     "not_found"),
    ("POST", "/vms", {"name": "db", "cpus": 1, "memory_mib": 64}, 409, "already_exists"),
    ("GET", "/vms/vm-nope", None, 404, "not_found"),
    ("DELETE", "/vms/vm-nope", None, 404, "not_found"),
    ("POST", "/vms/vm-nope/start", None, 404, "not_found"),
    ("POST", "/vms/{vm}/explode", None, 404, "not_found"),
    ("POST", "/vms/{vm}/pause", None, 409, "invalid_transition"),
    ("POST", "/vms/{vm}/resume", None, 409, "invalid_transition"),
    ("POST", "/vms/{vm}/stop", {"force": "yes please"}, 422, "invalid_request"),
    ("GET", "/vms?limit=0", None, 422, "invalid_request"),
    ("GET", "/vms?limit=100000", None, 422, "invalid_request"),
    ("GET", "/vms?sort=password", None, 422, "invalid_request"),
    ("GET", "/vms?cursor=%%%", None, 422, "invalid_request"),
    ("GET", "/vms?state=flying", None, 422, "invalid_request"),
    ("POST", "/hosts", {"name": "h1", "driver": "sim"}, 409, "already_exists"),
    ("POST", "/hosts", {"name": "h9", "driver": "vmware-magic"}, 422, "invalid_request"),
    ("POST", "/hosts", {"name": "h9", "driver": "nosuch"}, 422, "invalid_request"),
    ("POST", "/hosts", {"name": "h9", "capacity": {"cpus": -4, "memory_mib": 1,
                                                   "disk_gib": 1}}, 422, "invalid_request"),
    ("GET", "/hosts/ghost", None, 404, "not_found"),
    ("DELETE", "/hosts/h1", None, 409, "conflict"),
    ("POST", "/hosts/h1/maintenance/now", None, 404, "not_found"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "code"), BAD)
def test_bad_input_is_a_clear_4xx_and_changes_nothing(
        api: tuple[TestClient, ControlPlane], method: str, path: str, body: Any, status: int,
        code: str) -> None:
    client, plane = api
    r = client.post(f"{API}/vms", json={"name": "db", "cpus": 1, "memory_mib": 64,
                                        "start": False, "host": "h1"})
    vm = wait_state(client, r.json()["id"], "stopped")
    before = snapshot(plane.store)
    kwargs: dict[str, Any] = {}
    if isinstance(body, bytes):
        kwargs["content"] = body
        kwargs["headers"] = {"content-type": "application/json"}
    elif body is not None:
        kwargs["json"] = body
    r = client.request(method, API + path.replace("{vm}", vm["id"]), **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert snapshot(plane.store) == before


def test_snapshots_over_http(api: tuple[TestClient, ControlPlane]) -> None:
    pytest.importorskip("libvirt", reason="libvirt-python is not installed")
    client, _ = api
    r = client.post(f"{API}/hosts", json={"name": "lv", "driver": "libvirt",
                                          "uri": "test:///default",
                                          "capacity": {"cpus": 4, "memory_mib": 8192,
                                                       "disk_gib": 50},
                                          "config": {"pool_path": "/novacron"}})
    assert r.status_code == 201, r.text
    r = client.post(f"{API}/vms", json={"name": "snappy", "cpus": 1, "memory_mib": 64,
                                        "host": "lv"})
    assert r.status_code == 202, r.text
    vm = r.json()
    wait_state(client, vm["id"], "running")
    base = f"{API}/vms/{vm['id']}/snapshots"
    r = client.post(base, json={"name": "before-upgrade"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "before-upgrade"
    assert [s["name"] for s in client.get(base).json()["items"]] == ["before-upgrade"]
    assert client.post(f"{base}/before-upgrade/revert").status_code == 202
    assert client.post(f"{base}/no-such/revert").status_code == 404
    assert client.post(base, json={"name": "bad name!"}).status_code == 422
    assert client.delete(f"{base}/before-upgrade").status_code == 204
    assert client.get(base).json()["items"] == []
    client.delete(f"{API}/vms/{vm['id']}")
    wait_state(client, vm["id"], "deleted")


def test_snapshots_on_a_driver_without_them(api: tuple[TestClient, ControlPlane]) -> None:
    client, plane = api
    vm = client.post(f"{API}/vms", json={"name": "nosnap", "cpus": 1, "memory_mib": 64,
                                         "start": False}).json()
    wait_state(client, vm["id"], "stopped")
    before = snapshot(plane.store)
    r = client.post(f"{API}/vms/{vm['id']}/snapshots", json={"name": "s1"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "not_supported"
    assert "snapshot" in r.json()["error"]["message"]
    assert snapshot(plane.store) == before


def test_placement_plan_is_a_dry_run_with_explanations(
        api: tuple[TestClient, ControlPlane]) -> None:
    client, plane = api
    before = snapshot(plane.store)
    one = client.post(f"{API}/placement/plan", json={"vms": [
        {"name": "p0", "cpus": 1, "memory_mib": 64}]})
    assert one.status_code == 200, one.text
    [decision] = one.json()["items"]
    assert decision["host"] in ("h1", "h2")
    assert "hosts that fit" in decision["explanation"]
    assert set(decision["breakdown"]) >= {"binpack", "spread"}
    apart = {"group": "web", "affinity": "anti-affinity", "hard": True}
    batch = client.post(f"{API}/placement/plan", json={"vms": [
        {"name": f"w{i}", "cpus": 1, "memory_mib": 64, "placement": apart} for i in range(3)]})
    items = batch.json()["items"]
    assert sorted(i["host"] for i in items if i["host"]) == ["h1", "h2"]
    [refused] = [i for i in items if i["host"] is None]
    assert refused["error"]["code"] == "no_capacity"
    assert "anti-affinity" in refused["error"]["message"]
    assert snapshot(plane.store) == before  # nothing was created or reserved
    bad = client.post(f"{API}/placement/plan", json={"vms": []})
    assert bad.status_code == 422
