"""Migrations through the HTTP API: a prediction, a live migration followed to its end, refusals."""

from __future__ import annotations

import time
from typing import Any

import httpx

A = "/api/v1"


def poll(client: httpx.Client, path: str, done: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(path).json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"{path}: {body}"
        time.sleep(0.2)


def test_live_migration_over_http(http: httpx.Client) -> None:
    r = http.post(f"{A}/vms", json={"name": "mig-http", "cpus": 1, "memory_mib": 64,
                                    "disk_gib": 0, "host": "e1"})
    assert r.status_code == 202, r.text
    vm = poll(http, f"{A}/vms/{r.json()['id']}", lambda b: b["state"] == "running")

    r = http.post(f"{A}/migrations", json={"vm": "mig-http", "target_host": "e2",
                                           "dry_run": True})
    assert r.status_code == 202, r.text
    assert r.json()["prediction"]["converges"] is True
    assert http.get(f"{A}/migrations").json()["items"] == []  # a dry run moves nothing

    r = http.post(f"{A}/migrations", json={"vm": "mig-http", "target_host": "e2",
                                           "mode": "live", "policy": {"max_downtime_ms": 200}})
    assert r.status_code == 202, r.text
    mig_id = r.json()["id"]
    mig = poll(http, f"{A}/migrations/{mig_id}",
               lambda b: b["phase"] in ("completed", "failed", "rolled-back"))
    assert mig["phase"] == "completed", mig["reason"]
    assert mig["progress"]["percent"] == 100
    assert mig["outcome"]["downtime_ms"] > 0
    assert [m["id"] for m in http.get(f"{A}/migrations").json()["items"]] == [mig_id]
    moved = poll(http, f"{A}/vms/{vm['id']}", lambda b: b["state"] == "running")
    assert (moved["host"], moved["epoch"]) == ("e2", vm["epoch"] + 1)
    phases, since = [], 0
    while True:  # the phases as the event log tells them
        page = http.get(f"{A}/events", params={"since": since, "limit": 1000}).json()
        phases += [e["data"]["phase"] for e in page["items"]
                   if e["kind"] == "migration" and e["key"] == mig_id]
        if page["next"] == since:
            break
        since = page["next"]
    assert [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p] == [
        "pending", "preparing", "syncing-disk", "precopy", "stop-and-copy", "switchover",
        "completed"]

    assert http.post(f"{A}/migrations/{mig_id}/cancel").status_code == 409
    assert http.post(f"{A}/migrations/{mig_id}/rewind").status_code == 404
    assert http.get(f"{A}/migrations/mig-nope").status_code == 404
    r = http.post(f"{A}/migrations", json={"vm": "mig-http", "target_host": "e2"})
    assert r.status_code == 422
    assert "already on e2" in r.json()["error"]["message"]
    r = http.post(f"{A}/migrations", json={"vm": "mig-http", "target_host": "e1",
                                           "policy": {"post_copy": True}})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "not_supported"
