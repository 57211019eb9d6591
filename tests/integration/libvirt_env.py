"""The real-libvirt tier's machine: libvirt daemons, the tiny guest and a template image.

One session at a time uses them (a machine-wide lock): it starts, through
``scripts/libvirt-daemons.sh``, the system libvirtd and a second libvirtd on 127.0.0.2 as a
migration peer, builds the tiny busybox guest (:mod:`tests.libvirt_guest`), and stops the daemons
it started. Every guest prints a heartbeat counter to its serial console, appended to
``<console>/novacron-<vm_id>.log``, so a test can see that a guest is alive, paused, rebooted,
reverted, or migrated without a gap. The ``libvirt_env`` fixture (in ``conftest.py``) holds it
for the whole session; this module imports no libvirt, so collecting tests needs none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.libvirt_guest import GuestFiles, build_guest, missing_requirements

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ROOT / "scripts" / "libvirt-daemons.sh"
WORK = Path(os.environ.get("NOVACRON_LIBVIRT_WORK", "/var/tmp/novacron-it"))
LOCK = WORK / "session.lock"
SYSTEM_URI = "qemu:///system"
PEER_URI = f"qemu+tcp://{os.environ.get('NOVACRON_PEER_ADDR', '127.0.0.2')}/system"


def skip_unless_possible() -> None:
    """Skip the calling test module, with the exact reason, where this machine cannot run it."""
    if missing := missing_requirements():
        pytest.skip("the libvirt integration tier needs: " + "; ".join(missing)
                    + " (install with: sudo bash scripts/install-system-deps.sh)",
                    allow_module_level=True)


def daemons(action: str, which: str) -> str:
    """``scripts/libvirt-daemons.sh <action> <which>``; its output (``started``, ``running``)."""
    done = subprocess.run(["bash", str(DAEMONS), action, which], capture_output=True,
                          text=True, timeout=60)
    if done.returncode:
        raise RuntimeError(f"libvirt-daemons.sh {action} {which} failed: {done.stderr}")
    return done.stdout.strip()


@dataclass(frozen=True)
class LibvirtEnv:
    """What the session set up."""

    guest: GuestFiles
    template: Path  # an empty 64 MiB qcow2 image guests get overlays on
    console: Path  # where guests' serial consoles are logged
    system_started: bool  # whether this session started the system libvirtd (may restart it)

    def skip_unless_restartable(self) -> None:
        """Skip the calling test unless this session started the system libvirtd."""
        if not self.system_started:
            pytest.skip("the system libvirtd was already running before these tests; they only"
                        " restart a daemon they started")

    def console_log(self, vm_id: str) -> Path:
        return self.console / f"novacron-{vm_id}.log"

    def host_config(self, pool: tuple[str, str]) -> dict[str, str]:
        """A libvirt host's driver config: guests boot the tiny guest (TCG, no network), with
        their disks in ``pool`` (name, path)."""
        return {"pool": pool[0], "pool_path": pool[1], "domain_type": "qemu", "network": "none",
                "kernel": str(self.guest.kernel), "initrd": str(self.guest.initrd),
                "cmdline": self.guest.cmdline, "console_log_dir": str(self.console)}


@contextlib.contextmanager
def exclusive(timeout_s: float = 900.0) -> Iterator[None]:
    """Hold the machine-wide lock of this tier: test sessions share the daemons and pools."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another test session held {LOCK} for {timeout_s:.0f} s")
                time.sleep(0.5)
        yield


def session() -> Iterator[LibvirtEnv]:
    """Set the machine up under the lock; undo what this session started."""
    with exclusive():
        started = [which for which in ("system", "peer") if daemons("start", which) == "started"]
        try:
            guest = build_guest(WORK / "guest")
            template = WORK / "templates" / "base.qcow2"
            if not template.exists():
                template.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), "64M"],
                               check=True)
            console = WORK / f"console-{os.getpid()}"
            console.mkdir(parents=True)
            yield LibvirtEnv(guest=guest, template=template, console=console,
                             system_started="system" in started)
            shutil.rmtree(console, ignore_errors=True)
        finally:
            for which in reversed(started):
                daemons("stop", which)
