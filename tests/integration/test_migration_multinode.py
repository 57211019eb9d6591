"""Migrations between sim hosts on different Ray nodes (a multi-node ``ray.cluster_utils.Cluster``).

A Cluster is a Ray instance of its own, and a process holds one Ray at a time: this test runs
:mod:`tests.integration.multinode_scenario` in a child pytest, so the session's Ray
(``ray_session``) stays up, untouched, for the tests around it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIO = Path(__file__).with_name("multinode_scenario.py")
ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_cold_warm_and_live_migration_between_ray_nodes(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'scenario'}", "--timeout=240", str(SCENARIO)],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, f"{done.stdout[-12000:]}\n{done.stderr[-4000:]}"
    assert re.search(r"\b4 passed", done.stdout), done.stdout[-2000:]
