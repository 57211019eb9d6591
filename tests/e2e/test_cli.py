"""The `novacron` command as a user runs it: up, create, status, down, up again, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import kill_guests_under
from tests.e2e.conftest import free_port

NOVACRON = [sys.executable, "-m", "novacron.cli"]


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[tuple[list[str], Path, int]]:
    state = tmp_path / "cli-state"
    api_port = free_port()
    ports = ["--port", str(api_port), "--ray-port", str(free_port()),
             "--dashboard-port", str(free_port())]
    yield ports, state, api_port
    subprocess.run([*NOVACRON, "down", "--state-dir", str(state), "--stop-guests"],
                   capture_output=True, timeout=180, check=False)
    kill_guests_under(state)


def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*NOVACRON, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def ok(*args: str) -> str:
    proc = run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_up_create_down_up_down(cli: tuple[list[str], Path, int]) -> None:
    ports, state, api_port = cli
    sd = ["--state-dir", str(state)]
    assert "NovaCron is up" in ok("up", "--hosts", "2", *sd, *ports)
    assert httpx.get(f"http://127.0.0.1:{api_port}/healthz").status_code == 200

    created = json.loads(ok("vm", "create", "cli-vm", "--cpus", "1", "--memory", "64",
                            "--wait", "--json", *sd))
    vm: dict[str, Any] = created[0]
    assert vm["state"] == "running"
    assert vm["host"] in ("sim-1", "sim-2")
    pid = int(vm["guest_id"])
    bad = run("vm", "create", "cli-vm", "--cpus", "1", "--memory", "64", *sd)
    assert bad.returncode == 1
    assert "already exists" in bad.stderr
    bad = run("vm", "pause", "no-such-vm", *sd)
    assert bad.returncode == 1
    assert "no VM" in bad.stderr
    assert "hosts  2/2 up" in ok("status", *sd)
    assert "sim-1" in ok("host", "list", *sd)
    assert '"tenant": "*"' in ok("whoami", *sd)
    assert '"intact": true' in ok("audit", "verify", *sd)
    issued = json.loads(ok("token", "create", "ci", "viewer", "--tenant", "default", *sd))
    denied = run("vm", "stop", "cli-vm", "--token", issued["token"], *sd)
    assert denied.returncode == 1
    assert "not allowed" in denied.stderr

    assert "guests left running" in ok("down", *sd)
    assert psutil.pid_exists(pid)  # the guest outlives the control plane
    assert run("status", *sd).returncode == 1  # and the control plane is gone

    assert "NovaCron is up" in ok("up", *sd, *ports)
    shown = json.loads(ok("vm", "show", "cli-vm", "--json", *sd))[0]
    assert shown["guest_id"] == str(pid)  # re-attached to the same guest
    assert httpx.get(f"http://127.0.0.1:{api_port}/api/v1/vms").status_code == 401
    token = (state / "admin.token").read_text().strip()
    assert (state / "admin.token").stat().st_mode & 0o777 == 0o600
    listed = httpx.get(f"http://127.0.0.1:{api_port}/api/v1/vms",
                       headers={"Authorization": f"Bearer {token}"}).json()["items"]
    assert [v["name"] for v in listed] == ["cli-vm"]

    assert "1 guest(s) stopped" in ok("down", "--stop-guests", *sd)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_clear_errors_without_a_cluster(tmp_path: Path) -> None:
    proc = run("status", "--state-dir", str(tmp_path / "nothing"), "--address",
               "127.0.0.1:1")
    assert proc.returncode == 1
    assert "novacron up" in proc.stderr
    proc = run("vm", "create", "x", "--label", "novalue")
    assert proc.returncode == 2
    assert "key=value" in proc.stderr
