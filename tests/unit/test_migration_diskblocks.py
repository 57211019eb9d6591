"""Disk blocks of a live migration: batches read and written in place, and a DiskMirror keeping a
copy of a real sim guest's disk in step while the guest writes it (no Ray)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from novacron.drivers.base import GuestConfig
from novacron.drivers.sim import SimDriver
from novacron.drivers.simguest import DISK_BLOCK
from novacron.errors import InvalidRequest, NovaCronError
from novacron.migration.diskblocks import BlockBatch, DiskMirror, read_blocks, write_blocks
from novacron.migration.throttle import TokenBucket
from tests.conftest import kill_guests_under


def test_batches_round_trip_with_a_short_last_block(tmp_path: Path) -> None:
    bs = 4096
    source, target = tmp_path / "src.img", tmp_path / "dst.img"
    data = np.random.default_rng(7).integers(0, 256, 10 * bs + 100, dtype=np.uint8).tobytes()
    source.write_bytes(data)
    target.write_bytes(bytes(len(data)))
    blocks = np.array([0, 3, 4, 10])
    batches = list(read_blocks(source, bs, blocks))
    assert [b.index.tolist() for b in batches] == [[0, 3, 4, 10]]
    assert batches[0].wire_bytes == 4 * 8 + 4 * bs
    assert sum(write_blocks(target, b) for b in batches) == 3 * bs + 100  # not past the end
    copy = target.read_bytes()
    assert len(copy) == len(data)
    for block in range(11):
        part = slice(block * bs, (block + 1) * bs)
        assert (copy[part] == data[part]) == (block in blocks.tolist() or not any(data[part]))
    with pytest.raises(InvalidRequest, match="outside"):
        write_blocks(target, BlockBatch(np.array([11]), np.zeros((1, bs), dtype=np.uint8)))


def test_many_blocks_come_in_batches(tmp_path: Path) -> None:
    image = tmp_path / "img"
    with open(image, "wb") as f:
        f.truncate(200 * DISK_BLOCK)
    batches = list(read_blocks(image, DISK_BLOCK, np.arange(200)))
    assert [len(b.index) for b in batches] == [128, 72]  # 8 MiB each


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[SimDriver]:
    """A running sim guest that writes its 1 GiB disk at 32 MiB/s."""
    driver = SimDriver("h", None, {"memory_dir": str(tmp_path / "shm")}, tmp_path / "state")
    driver.connect()
    driver.define(GuestConfig(vm_id="vm-w", name="vm-w", cpus=1, memory_mib=16, disk_gib=1,
                              workload={"dirty_rate_mib_s": 0, "disk_write_mib_s": 32}))
    driver.start("vm-w", epoch=1)
    yield driver
    with contextlib.suppress(NovaCronError):
        driver.stop("vm-w", force=True)
    kill_guests_under(tmp_path / "state")


def test_mirror_keeps_a_copy_of_a_written_disk_byte_identical(writer: SimDriver,
                                                              tmp_path: Path) -> None:
    paths = writer.memory_paths("vm-w")
    target = tmp_path / "copy.img"
    mirror = DiskMirror(paths.disk, paths.disk_generations, partial(write_blocks, target),
                        TokenBucket(256 * 1024**2))
    copy_sparse(paths.disk, target)  # the first copy, taken while the guest writes
    on_wire: list[int] = []
    for _ in range(3):  # passes while it runs: what it wrote since the last look
        await_writes(writer)
        assert mirror.collect() > 0
        assert mirror.send(on_batch=on_wire.append).blocks > 0
    assert sum(on_wire) == mirror.bytes_sent
    await_writes(writer)  # after the last pass
    writer.pause("vm-w")
    assert not same_file(paths.disk, target)  # those writes are not on the copy yet
    last = mirror.finish()
    assert 0 < last.blocks < 1024**3 // DISK_BLOCK // 100  # a few blocks, not the disk
    assert same_file(paths.disk, target)


def await_writes(driver: SimDriver) -> None:
    """Wait until the guest writes its disk again."""
    written = driver.read_status("vm-w").disk_bytes_written
    deadline = time.monotonic() + 10
    while driver.read_status("vm-w").disk_bytes_written <= written:
        assert time.monotonic() < deadline, "the guest stopped writing"
        time.sleep(0.01)


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of a sparse file's data (its holes read as zeros)."""
    extents: list[tuple[int, int]] = []
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:  # only a hole after offset
                break
            offset = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            extents.append((start, offset))
    return extents


def copy_sparse(source: Path, target: Path) -> None:
    """Copy a sparse file's data (its holes stay holes)."""
    with open(source, "rb") as fin, open(target, "wb") as fout:
        fout.truncate(os.path.getsize(source))
        for start, end in data_extents(source):
            fin.seek(start)
            fout.seek(start)
            fout.write(fin.read(end - start))


def same_file(a: Path, b: Path) -> bool:
    """Whether two sparse files hold the same bytes (compared where either holds data)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in data_extents(a) + data_extents(b):
            fa.seek(start)
            fb.seek(start)
            if fa.read(end - start) != fb.read(end - start):
                return False
    return True
