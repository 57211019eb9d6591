"""Shared fixtures: temporary state dirs whose sim guests are always killed afterwards."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest


def kill_guests_under(path: Path) -> int:
    """Kill every simulated guest process whose command line names ``path``."""
    marker = str(path)
    killed = 0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or ())
            if "simguest" in cmdline and marker in cmdline:
                os.kill(proc.pid, signal.SIGKILL)
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return killed


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state directory; sim guests started under it are killed at teardown."""
    path = tmp_path / "state"
    path.mkdir()
    yield path
    kill_guests_under(path)


def sim_host_config(state_dir: Path, cpus: int = 8, memory_mib: int = 16384,
                    disk_gib: int = 100) -> dict[str, object]:
    """The config of a sim host whose guest memory lives under ``state_dir``."""
    return {"capacity": {"cpus": cpus, "memory_mib": memory_mib, "disk_gib": disk_gib},
            "memory_dir": str(state_dir / "shm")}


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray instance for the whole test session (integration and e2e tiers); always a
    new one (``address="local"``), never a cluster someone started on this machine."""
    import logging

    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="novacron-tests",
             logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()
