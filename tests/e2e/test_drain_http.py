"""Drain and rebalance through the HTTP API served by Ray Serve: the routes, the drain status on
the host, refusals. (The evacuation of running VMs is in tests/integration/test_drain.py.)"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import sim_host_config
from tests.e2e.test_migration_http import poll

A = "/api/v1"


def test_drain_and_rebalance_over_http(http: httpx.Client,
                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    config = sim_host_config(tmp_path_factory.mktemp("e3"))
    r = http.post(f"{A}/hosts", json={"name": "e3", "driver": "sim", "config": config})
    assert r.status_code == 201, r.text
    try:
        r = http.post(f"{A}/hosts/e3/drain")
        assert r.status_code == 202, r.text
        host = poll(http, f"{A}/hosts/e3", lambda b: b["drain"]["state"] == "completed")
        assert host["state"] == "maintenance"
        assert host["drain"]["message"] == ("completed: 0 VM(s) moved; the host is in "
                                            "maintenance")
        assert http.post(f"{A}/hosts/e3/drain").json()["drain"] == host["drain"]  # idempotent
        r = http.post(f"{A}/hosts/e3/drain/cancel")
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "invalid_transition"
        r = http.post(f"{A}/vms", json={"name": "nope", "cpus": 1, "memory_mib": 32,
                                        "host": "e3"})
        assert r.status_code == 409
        assert "1 maintenance" in r.json()["error"]["message"]
        assert http.post(f"{A}/hosts/nope/drain").status_code == 404
        assert http.post(f"{A}/hosts/e3/activate").json()["state"] == "up"
    finally:
        http.post(f"{A}/hosts/e3/activate")
        http.delete(f"{A}/hosts/e3")

    r = http.post(f"{A}/placement/rebalance", json={"dry_run": True})
    assert r.status_code == 200, r.text
    plan = r.json()
    assert set(plan) == {"dry_run", "enabled", "before", "after", "items", "notes"}
    assert plan["dry_run"] is True
    assert plan["enabled"] is False
    assert plan["before"]["hosts"] >= 1  # the up hosts (e3 is gone again)
    assert http.post(f"{A}/placement/rebalance", json={"apply": True}).status_code == 422
