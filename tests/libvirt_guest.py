"""The tiny guest the libvirt integration tests boot, built from Debian packages on this machine.

The kernel comes from the ``linux-image-*-cloud-amd64`` .deb that
``scripts/install-system-deps.sh`` downloads (extracted with ``dpkg-deb -x``, never installed);
the initramfs is ``busybox-static`` with a few kernel modules. Its init prints
``novacron-guest-up`` and then ``novacron-heartbeat <n>`` to the serial console about every
0.2 s, writing the counter to the first disk too (so block counters move), and powers off on an
ACPI power-button press (``novacron-guest-poweroff``), which libvirt's graceful shutdown and
reboot send.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEB_CACHE = Path(os.environ.get("NOVACRON_DEB_CACHE", "/var/cache/novacron/debs"))
BUSYBOX = Path("/bin/busybox")
CMDLINE = "console=ttyS0 panic=-1 quiet"
HEARTBEAT = re.compile(rb"novacron-heartbeat (\d+)")
GUEST_UP = b"novacron-guest-up"
GUEST_POWEROFF = b"novacron-guest-poweroff"

# Loaded in this order (modules.dep is not shipped in the .deb; these have no other deps).
_MODULES = (
    "drivers/virtio/virtio", "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci", "drivers/virtio/virtio_balloon", "drivers/block/virtio_blk",
    "drivers/input/evdev", "drivers/acpi/button",
)

_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in {modules}; do insmod /lib/modules/$m.ko; done
mkdir -p /var/log
acpid
echo novacron-guest-up
i=0
while :; do
    echo "novacron-heartbeat $i"
    [ -b /dev/vda ] && echo "$i" | dd of=/dev/vda bs=512 seek=$((i % 2048)) conv=notrunc,fsync \
        2>/dev/null
    i=$((i+1))
    sleep 0.2
done
"""

_POWER_BUTTON = """#!/bin/sh
echo novacron-guest-poweroff >/dev/console
poweroff -f
"""


@dataclass(frozen=True)
class GuestFiles:
    """A bootable kernel, its initramfs and the command line."""

    kernel: Path
    initrd: Path
    cmdline: str = CMDLINE


def kernel_deb() -> Path | None:
    """The cached cloud kernel package, if downloaded."""
    debs = sorted(DEB_CACHE.glob("linux-image-*-cloud-amd64_*.deb"))
    return debs[-1] if debs else None


def missing_requirements() -> list[str]:
    """What this machine lacks to run the libvirt integration tier, each said exactly."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the tests start libvirtd and a second libvirtd in a mount"
                       " namespace)")
    for tool, package in (("libvirtd", "libvirt-daemon-system"), ("virsh", "libvirt-clients"),
                          ("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils"),
                          ("cpio", "cpio"), ("dpkg-deb", "dpkg"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (package {package})")
    if not BUSYBOX.is_file():
        missing.append(f"{BUSYBOX} (package busybox-static)")
    if kernel_deb() is None:
        missing.append(f"the linux-image-cloud-amd64 .deb in {DEB_CACHE}")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        missing.append("libvirt-python in the venv (pip install 'novacron[libvirt]')")
    return missing


def build_guest(out: Path) -> GuestFiles:
    """Build the guest's kernel and initrd into ``out`` (reused while their inputs match)."""
    deb = kernel_deb()
    if deb is None:
        raise FileNotFoundError(f"no linux-image-*-cloud-amd64 .deb in {DEB_CACHE}")
    out.mkdir(parents=True, exist_ok=True)
    files = GuestFiles(kernel=out / "vmlinuz", initrd=out / "initrd.img")
    stamp = out / "inputs.sha256"
    inputs = hashlib.sha256("\0".join(
        (deb.name, str(deb.stat().st_size), _INIT, _POWER_BUTTON, *_MODULES)).encode()
    ).hexdigest()
    if (files.kernel.is_file() and files.initrd.is_file() and stamp.is_file()
            and stamp.read_text() == inputs):
        return files
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        extracted = Path(tmp) / "deb"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(extracted)], check=True)
        kernels = sorted((extracted / "boot").glob("vmlinuz-*"))
        module_dirs = sorted((extracted / "lib/modules").glob("*/kernel"))
        if not kernels or not module_dirs:
            raise FileNotFoundError(f"{deb} has no kernel or modules")
        root = Path(tmp) / "root"
        for sub in ("bin", "proc", "sys", "dev", "lib/modules", "etc/acpi/PWRF"):
            (root / sub).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin/busybox")
        for module in _MODULES:
            shutil.copy2(module_dirs[0] / f"{module}.ko", root / "lib/modules")
        names = " ".join(m.rsplit("/", 1)[1] for m in _MODULES)
        _script(root / "init", _INIT.format(modules=names))
        _script(root / "etc/acpi/PWRF/00000080", _POWER_BUTTON)
        listing = "\n".join(str(p.relative_to(root)) for p in sorted(root.rglob("*")))
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root,
                                 input=f".\n{listing}\n".encode(), capture_output=True,
                                 check=True).stdout
        tmp_initrd = Path(tmp) / "initrd.img"
        tmp_initrd.write_bytes(gzip.compress(archive, compresslevel=1))
        shutil.copy(kernels[0], files.kernel)
        os.replace(tmp_initrd, files.initrd)
    for path in (files.kernel, files.initrd):
        path.chmod(0o644)
    stamp.write_text(inputs)
    return files


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def heartbeats(log: Path) -> list[int]:
    """Every heartbeat counter in a serial log, in order."""
    if not log.exists():
        return []
    return [int(m.group(1)) for m in HEARTBEAT.finditer(log.read_bytes())]


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def wait_heartbeats(log: Path, count: int, timeout_s: float = 60.0) -> list[int]:
    """Wait until the log has ``count`` more heartbeats than now; returns all of them."""
    start = len(heartbeats(log))
    wait_until(lambda: len(heartbeats(log)) >= start + count, timeout_s,
               f"{count} heartbeats in {log}")
    return heartbeats(log)
