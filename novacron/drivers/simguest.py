"""One simulated guest: a small stdlib-only process that owns a VM's memory, disk and workload.

Simulated, and honest about it: there is no CPU emulation and no guest OS. What is real is what
NovaCron manages: an OS process that lives and dies on its own, RAM that is a shared-memory file
the guest keeps writing, a sparse disk image it writes to, and CPU time it burns.

:class:`novacron.drivers.sim.SimDriver` starts it as ``python -m novacron.drivers.simguest
--dir GUEST_DIR --memory M --generations G --control C --disk D --disk-generations DG
[--incoming]`` in a new session (setsid). The process forks once more; the parent writes the
child's pid to ``GUEST_DIR/pid`` and exits, so the guest is reparented to init (or the nearest
subreaper), belongs to no actor's process group, never lingers as its launcher's zombie and
outlives whatever started it. This module imports only the standard library (no numpy); with the
package's ``__init__`` modules the process takes about 13 MB RSS plus the guest memory it touches.

Files (sizes are fixed by the driver before launch)::

    memory       memory_pages * 4 KiB, sparse, mapped shared: the guest's RAM
    generations  one native-endian uint32 per 4 KiB page: the page's write generation
    control      a 4 KiB header: IDENTITY at 0 and WORKLOAD at 128 (written by the driver),
                 STATUS at 64 (written by the guest, once per tick)
    disk         the disk image, written with pwrite at the workload's disk rate, at most one
                 64 KiB block (DISK_BLOCK) per write, at block-aligned offsets
    disk-generations  one native-endian uint32 per 64 KiB block of the disk: its write generation

Write-generation protocol (dirty tracking for pre-copy live migration)
---------------------------------------------------------------------
The guest is the only writer of memory and of the generations. To write page ``p`` it

1. sets ``gen[p] += 1`` (now odd: a write is in progress),
2. writes the page's bytes (often only a few 64-byte cache lines),
3. sets ``gen[p] += 1`` again (now even: the write is complete), *after* the bytes.

Generations only grow (mod 2**32) while the memory file lives; nobody clears them. A migrator
takes a snapshot (a plain copy of the array) *before* copying pages and later compares a new
snapshot ``b`` with the previous one ``a``: page ``p`` is dirty since ``a`` if ``b[p] != a[p]`` or
``b[p]`` is odd. Any write a page copy could have missed bumps the generation after the snapshot
that preceded the copy, so the first test catches it; the second catches a write caught half done
(e.g. by SIGSTOP at switchover, where the guest cannot finish it). This replaces a shared dirty
bitmap: a bitmap must be cleared by the migrator while the guest sets bits, and without atomics
across processes a set between the reader's read and its clear is lost. Here no word is written by
two processes. The guest's stores become visible in program order on x86-64 (TSO); a stopped guest
(SIGSTOP, state ``T``) has made all of its stores visible, so the final round is exact. A guest
started ``--incoming`` on migrated memory and generations first makes every odd generation even
(+1): the half-done write was copied as it stood and is over.

Disk writes follow the same protocol with the disk generations, one per 64 KiB block: ``+1``,
``pwrite`` (one block at most, at a block-aligned offset), ``+1``. A migrator that snapshots them
before copying blocks knows every block written since, so a live migration sends only those blocks
while the guest is paused. They count writes since the guest process started (the file lives in
shared memory, like the memory generations); an incoming guest starts them from zero.

Incoming migration
------------------
A guest started ``--incoming`` maps its files, publishes phase INCOMING and waits, as a QEMU
started with ``-incoming`` does, so that starting a process is not part of a migration's downtime.
The migrator fills its memory and generations meanwhile, and at switchover writes the source's
control header (counters and workload) and sends SIGUSR1: the guest then takes over (counters
from the header, odd generations made even) and runs. SIGTERM while it waits ends it.

Signals: SIGTERM (or SIGINT) shuts down cleanly; SIGHUP reboots (boot_count + 1, same pid, memory
kept, the boot populates its working set again, as a reset QEMU guest keeps its RAM); SIGSTOP and
SIGCONT pause and resume it for real; SIGUSR1 hands an incoming guest over (it stays blocked
otherwise, so a late one does nothing).
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import random
import signal
import struct
import sys
import time
from enum import IntEnum
from types import FrameType

PAGE_SIZE = 4096
LINE_SIZE = 64  # a cache line: the unit of small rewrites, so page deltas (XBZRLE) are meaningful
GENERATION_SIZE = 4  # bytes per page in the generations file (uint32)
GENERATION_MASK = 0xFFFFFFFF
CONTROL_SIZE = 4096
MAGIC = b"NCSG"
LAYOUT_VERSION = 1
TICK_S = 0.01
BLOCK_PAGES = 64  # the working set is made of 256 KiB blocks of contiguous pages
DISK_BLOCK = 64 * 1024  # the unit of disk writes and of the disk generations

# Identity: written by the driver when it creates the file. Offset 0.
IDENTITY = struct.Struct("<4sIIIQQ")
IDENTITY_FIELDS = ("magic", "version", "page_size", "layout_seed", "memory_pages", "epoch")
IDENTITY_OFFSET = 0
EPOCH_OFFSET = IDENTITY_OFFSET + IDENTITY.size - 8
# Status: written by the guest once per tick (each field an aligned 8-byte word). Offset 64.
STATUS = struct.Struct("<8Q")
STATUS_FIELDS = ("pid", "phase", "boot_count", "ticks", "pages_dirtied_total", "touched_pages",
                 "disk_bytes_written", "heartbeat_ns")
STATUS_OFFSET = 64
# Workload: written by the driver (or a migrator: throttle), read by the guest every tick.
WORKLOAD = struct.Struct("<5d")
WORKLOAD_FIELDS = ("dirty_rate_mib_s", "cpu_busy", "disk_write_mib_s", "throttle_pct",
                   "populate_fraction")
WORKLOAD_OFFSET = 128

_LINE = struct.Struct("<8Q")
_ODD = bytes(i & 1 for i in range(256))  # translation table: byte -> its lowest bit
_ZERO_PAGE = bytes(PAGE_SIZE)
_STAMP = struct.Struct("<QQ")
_MIB = 1024 * 1024

log = logging.getLogger("novacron.drivers.simguest")


class GuestSetupError(Exception):
    """The guest's files do not match what the driver described."""


class Phase(IntEnum):
    """What the guest process is doing, as published in its status."""

    LAUNCHED = 0  # control file created; the process has not attached yet
    BOOTING = 1  # populating its working set
    RUNNING = 2
    STOPPING = 3  # shutting down cleanly
    INCOMING = 4  # started --incoming: waiting for a migrator to hand its memory over


class Guest:
    """The guest's memory, disk and workload loop."""

    def __init__(self, memory: str, generations: str, control: str, disk: str,
                 disk_generations: str, *, incoming: bool) -> None:
        self._ctl = _map(control, CONTROL_SIZE)
        magic, version, page_size, seed, pages, _epoch = IDENTITY.unpack_from(
            self._ctl, IDENTITY_OFFSET)
        if (magic, version, page_size) != (MAGIC, LAYOUT_VERSION, PAGE_SIZE):
            raise GuestSetupError(f"{control}: not a NovaCron sim control file of layout "
                                  f"{LAYOUT_VERSION}")
        self._mem = _map(memory, pages * PAGE_SIZE)
        self._gen_map = _map(generations, pages * GENERATION_SIZE)
        self._gen = memoryview(self._gen_map).cast("I")
        self._disk_fd = os.open(disk, os.O_WRONLY | os.O_CLOEXEC)
        self._disk_size = os.fstat(self._disk_fd).st_size
        disk_blocks = -(-self._disk_size // DISK_BLOCK)
        self._disk_gen = memoryview(_map(disk_generations, disk_blocks * GENERATION_SIZE)
                                    if disk_blocks else bytearray()).cast("I")
        self._pages = pages
        self._seed = seed
        self._load_counters()
        self._incoming = incoming
        self._phase = Phase.BOOTING
        self._rng = random.Random()
        self._templates = [_template(i) for i in range(8)]
        self._blocks: list[int] = []
        self._cursor = 0
        self._disk_cursor = 0
        self._dirty_debt = 0.0
        self._disk_debt = 0.0
        self._stopping = False
        self._reboot = False

    def _load_counters(self) -> None:
        """Carry on the counters in the status header (a reboot, or the source's, migrated)."""
        status = dict(zip(STATUS_FIELDS, STATUS.unpack_from(self._ctl, STATUS_OFFSET),
                          strict=True))
        self._boot_count = status["boot_count"]
        self._ticks = status["ticks"]
        self._dirtied = status["pages_dirtied_total"]
        self._touched_count = status["touched_pages"]  # pages whose generation is not zero
        self._disk_written = status["disk_bytes_written"]

    def _adopt_generations(self) -> None:
        """Complete the writes a migration caught half done (odd generations).

        It runs within a migration's downtime, so it scans a byte string, not page by page.
        """
        low = 0 if sys.byteorder == "little" else GENERATION_SIZE - 1
        odd = self._gen_map[low::GENERATION_SIZE].translate(_ODD)
        page = odd.find(1)
        while page >= 0:  # its bytes were copied as they were: the write is over
            self._gen[page] = (self._gen[page] + 1) & GENERATION_MASK
            page = odd.find(1, page + 1)

    # -- signals ----------------------------------------------------------------------------
    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _on_reboot(self, signum: int, frame: FrameType | None) -> None:
        self._reboot = True

    # -- status and workload ----------------------------------------------------------------
    def _publish(self) -> None:
        STATUS.pack_into(self._ctl, STATUS_OFFSET, os.getpid(), self._phase, self._boot_count,
                         self._ticks, self._dirtied, self._touched_count, self._disk_written,
                         time.time_ns())

    def _workload(self) -> dict[str, float]:
        return dict(zip(WORKLOAD_FIELDS, WORKLOAD.unpack_from(self._ctl, WORKLOAD_OFFSET),
                        strict=True))

    # -- memory -----------------------------------------------------------------------------
    def _layout(self, fraction: float) -> None:
        """Choose the working set: blocks of contiguous pages, the same on every boot."""
        nblocks = self._pages // BLOCK_PAGES
        want = min(nblocks, max(1, round(nblocks * fraction)))
        self._blocks = sorted(random.Random(self._seed).sample(range(nblocks), want))

    def _ws_page(self, index: int) -> int:
        block, offset = divmod(index, BLOCK_PAGES)
        return self._blocks[block] * BLOCK_PAGES + offset

    def _write(self, page: int, kind: int) -> None:
        """Write one page under the generation protocol (see the module docstring)."""
        gen, mem, rng = self._gen, self._mem, self._rng
        before = gen[page]
        gen[page] = (before + 1) & GENERATION_MASK
        off = page * PAGE_SIZE
        if kind == 0:  # a few cache lines: counters (compressible) or random bytes
            for n in range(rng.randint(1, 4)):
                line = off + rng.randrange(PAGE_SIZE // LINE_SIZE) * LINE_SIZE
                if rng.random() < 0.7:
                    _LINE.pack_into(mem, line, self._dirtied, page, self._ticks,
                                    self._boot_count, n, 0, 0, 0)
                else:
                    mem[line:line + LINE_SIZE] = rng.randbytes(LINE_SIZE)
        elif kind == 1:  # structured, compressible text
            mem[off:off + PAGE_SIZE] = self._templates[page % len(self._templates)]
            _STAMP.pack_into(mem, off, page, self._dirtied)
        elif kind == 2:  # random, incompressible
            mem[off:off + PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
        elif kind == 3:  # mostly zero, a few lines of small integers (a fresh heap page)
            mem[off:off + PAGE_SIZE] = _ZERO_PAGE
            for n in range(rng.randint(1, 6)):
                _LINE.pack_into(mem, off + rng.randrange(PAGE_SIZE // LINE_SIZE) * LINE_SIZE,
                                page, n, self._boot_count, 0, 0, 0, 0, 1)
        else:  # freed and zeroed
            mem[off:off + PAGE_SIZE] = _ZERO_PAGE
        gen[page] = (before + 2) & GENERATION_MASK
        self._dirtied += 1
        if not before:  # the first write to this page
            self._touched_count += 1

    def _populate(self) -> None:
        """Fill the working set with mixed content, as an OS does while it boots."""
        rng = self._rng
        for index in range(len(self._blocks) * BLOCK_PAGES):
            if self._stopping:
                return
            r = rng.random()
            self._write(self._ws_page(index), 1 if r < 0.45 else 3 if r < 0.75 else 2)
            if index % 4096 == 0:
                self._publish()

    def _next_dirty_page(self) -> int:
        """A page of the working set, with locality: runs, a hot region, rare far jumps."""
        size = len(self._blocks) * BLOCK_PAGES
        r = self._rng.random()
        if r < 0.6:
            self._cursor = (self._cursor + 1) % size
        elif r < 0.9:
            self._cursor = self._rng.randrange(max(1, size // 5))
        else:
            self._cursor = self._rng.randrange(size)
        return self._ws_page(self._cursor)

    def _dirty(self, count: int) -> None:
        rng = self._rng
        for _ in range(count):
            r = rng.random()
            self._write(self._next_dirty_page(),
                        0 if r < 0.7 else 1 if r < 0.85 else 2 if r < 0.95 else 4)

    # -- disk -------------------------------------------------------------------------------
    def _write_disk(self, nbytes: int) -> None:
        """Write ``nbytes`` to the disk image: mostly a sequential log, some random blocks,
        each write under the generation protocol (see the module docstring)."""
        blocks = self._disk_size // DISK_BLOCK
        gen = self._disk_gen
        if nbytes <= 0 or not blocks:
            return
        data = (self._templates[0] * (DISK_BLOCK // PAGE_SIZE // 2)
                + self._rng.randbytes(DISK_BLOCK // 2))
        while nbytes > 0:
            size = min(DISK_BLOCK, nbytes)
            if self._rng.random() < 0.8:
                self._disk_cursor = (self._disk_cursor + 1) % blocks
                block = self._disk_cursor
            else:
                block = self._rng.randrange(blocks)
            before = gen[block]
            gen[block] = (before + 1) & GENERATION_MASK
            self._disk_written += os.pwrite(self._disk_fd, data[:size], block * DISK_BLOCK)
            gen[block] = (before + 2) & GENERATION_MASK
            nbytes -= size

    # -- life -------------------------------------------------------------------------------
    def _boot(self) -> None:
        self._reboot = False
        self._boot_count += 1
        self._phase = Phase.BOOTING
        self._publish()
        fraction = self._workload()["populate_fraction"]
        self._layout(fraction)
        if fraction > 0:
            self._populate()
        self._phase = Phase.RUNNING
        self._publish()
        log.info("boot %d: %d of %d pages touched", self._boot_count, self._touched_count,
                 self._pages)

    def _tick(self, dt: float) -> None:
        work = self._workload()
        share = 1.0 - min(max(work["throttle_pct"], 0.0), 99.0) / 100.0
        started = time.perf_counter()
        self._dirty_debt += work["dirty_rate_mib_s"] * _MIB / PAGE_SIZE * dt * share
        count = int(self._dirty_debt)
        self._dirty_debt -= count
        self._dirty(count)
        self._disk_debt += work["disk_write_mib_s"] * _MIB * dt * share
        nbytes = int(self._disk_debt)
        self._disk_debt -= nbytes
        self._write_disk(nbytes)
        busy_until = started + work["cpu_busy"] * TICK_S * share
        while time.perf_counter() < busy_until:
            pass
        self._ticks += 1
        self._publish()

    def _await_handover(self) -> bool:
        """Publish INCOMING and wait for SIGUSR1 (True: take over) or SIGTERM (False)."""
        self._phase = Phase.INCOMING
        self._publish()
        while not self._stopping:
            if signal.sigtimedwait([signal.SIGUSR1], 0.1) is not None:
                return True
        return False

    def _take_over(self) -> None:
        """Run on from where the source stopped: its counters and workload (the control header
        the migrator wrote) and its memory, without booting."""
        started = time.perf_counter()
        self._load_counters()
        self._adopt_generations()
        self._layout(self._workload()["populate_fraction"])
        self._phase = Phase.RUNNING
        self._publish()
        log.info("took over migrated memory in %.1f ms: %d of %d pages touched",
                 (time.perf_counter() - started) * 1000, self._touched_count, self._pages)

    def run(self) -> None:
        """Boot (or, incoming, wait for a migration's handover) and run until SIGTERM."""
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reboot)
        if not self._incoming:
            self._boot()
        elif self._await_handover():
            self._take_over()
        last = next_tick = time.monotonic()
        while not self._stopping:
            if self._reboot:
                self._boot()
            now = time.monotonic()
            self._tick(min(now - last, 10 * TICK_S))  # no burst of catch-up after a pause
            last = now
            next_tick = max(next_tick + TICK_S, time.monotonic() - TICK_S)
            time.sleep(max(0.0, next_tick - time.monotonic()))
        self._phase = Phase.STOPPING
        self._publish()
        log.info("stopped cleanly after %d ticks, %d pages dirtied", self._ticks, self._dirtied)


def _map(path: str, size: int) -> mmap.mmap:
    """Map ``path`` (which must be ``size`` bytes) shared, read-write."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise GuestSetupError(f"{path}: {actual} bytes, expected {size}")
        return mmap.mmap(fd, size, mmap.MAP_SHARED)
    finally:
        os.close(fd)


def _template(seed: int) -> bytes:
    """A page of repetitive, text-like records (compresses well, as most RAM does)."""
    record = (f"rec={seed:04d};svc=sim-{seed * 7919 % 1000:03d};state=ok;ttl=300;"
              f"owner=tenant-{seed % 5};").encode()
    return (record * (PAGE_SIZE // len(record) + 1))[:PAGE_SIZE]


def _write_pidfile(path: str, pid: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def _remove_pidfile(path: str) -> None:
    """Remove the pidfile if it still names this process (a clean exit is not a crash)."""
    try:
        with open(path, encoding="ascii") as f:
            mine = f.read().strip() == str(os.getpid())
        if mine:
            os.unlink(path)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Detach (second fork), then run the guest until it is told to stop."""
    parser = argparse.ArgumentParser(prog="simguest", description="Run one simulated guest.")
    parser.add_argument("--dir", required=True, help="the guest's directory (pidfile, log)")
    parser.add_argument("--memory", required=True)
    parser.add_argument("--generations", required=True)
    parser.add_argument("--control", required=True)
    parser.add_argument("--disk", required=True)
    parser.add_argument("--disk-generations", required=True)
    parser.add_argument("--incoming", action="store_true",
                        help="wait for a migrator to hand memory over (SIGUSR1), then run on it "
                             "instead of booting")
    args = parser.parse_args(argv)
    pidfile = os.path.join(args.dir, "pid")
    # Blocked before the fork, so it is blocked as soon as the pidfile names the guest: only
    # sigtimedwait takes it (an incoming guest's handover); elsewhere it stays pending.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    child = os.fork()
    if child:
        _write_pidfile(pidfile, child)
        os._exit(0)
    os.chdir("/")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [pid {os.getpid()}] %(message)s")
    try:
        Guest(args.memory, args.generations, args.control, args.disk, args.disk_generations,
              incoming=args.incoming).run()
    except (OSError, GuestSetupError) as exc:
        log.error("guest failed: %s", exc)
        return 1
    finally:
        _remove_pidfile(pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
