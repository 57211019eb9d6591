"""Disk blocks of a live migration: the blocks a running guest wrote, read from the source image
and written in place into the target's copy.

A :class:`DiskMirror` follows a sim guest's disk write generations (the protocol of
:mod:`novacron.drivers.simguest`, as for memory pages): created just before the image is first
copied, it snapshots them; :meth:`DiskMirror.collect` adds the blocks written since the last
snapshot to those to send and :meth:`DiskMirror.send` sends them as they are now, so that after
the guest is paused a last ``collect`` and ``send`` (:meth:`DiskMirror.finish`) leaves the
target's image equal to the source's. :func:`read_blocks` reads blocks into batches of about
``BATCH_BYTES`` and :func:`write_blocks` applies a batch on the target (the caller says how a
batch gets there). Blocks are fixed-size rows; only the last block of an image may be short, and
only its bytes inside the image are written. Pure file I/O and numpy, no Ray.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from novacron.drivers.sim import dirty_pages, read_generations
from novacron.drivers.simguest import DISK_BLOCK
from novacron.errors import InvalidRequest
from novacron.migration.throttle import TokenBucket

BATCH_BYTES = 8 * 1024 * 1024
_INDEX_BYTES = 8  # a block index on the wire


@dataclass(frozen=True)
class BlockBatch:
    """Blocks ``index`` of an image, one row of ``data`` each (a short last block is padded)."""

    index: npt.NDArray[np.int64]
    data: npt.NDArray[np.uint8]

    @property
    def block_size(self) -> int:
        return int(self.data.shape[1])

    @property
    def wire_bytes(self) -> int:
        return _INDEX_BYTES * len(self.index) + self.data.nbytes


def read_blocks(path: str | os.PathLike[str], block_size: int,
                blocks: npt.NDArray[np.integer]) -> Iterator[BlockBatch]:
    """Batches of the given blocks of an image as they are when each batch is read."""
    if block_size <= 0:
        raise InvalidRequest("block size must be positive", details={"block_size": block_size})
    per_batch = max(1, BATCH_BYTES // block_size)
    index = np.asarray(blocks, dtype=np.int64)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start in range(0, len(index), per_batch):
            part = index[start:start + per_batch]
            data = np.zeros((len(part), block_size), dtype=np.uint8)
            for row, block in zip(data, part.tolist(), strict=True):
                os.preadv(fd, [row.data], block * block_size)  # a short read leaves zeros
            yield BlockBatch(part, data)
    finally:
        os.close(fd)


def write_blocks(path: str | os.PathLike[str], batch: BlockBatch) -> int:
    """Write a batch in place into an image (never past its end); returns the bytes written."""
    bs = batch.block_size
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for row, block in zip(batch.data, batch.index.tolist(), strict=True):
            offset = block * bs
            if not 0 <= offset < size:
                raise InvalidRequest("block outside the image",
                                     details={"block": block, "image_size": size})
            written += os.pwrite(fd, row[:min(bs, size - offset)], offset)
    finally:
        os.close(fd)
    return written


@dataclass(frozen=True)
class BlockPass:
    """What one pass of disk blocks moved: blocks, their bytes, the bytes on the wire, and how
    long it took."""

    blocks: int
    bytes: int
    wire_bytes: int
    seconds: float


class DiskMirror:
    """The target's copy of a running sim guest's disk, brought up to date pass by pass.

    ``write`` applies a batch to the target's image (in process, or on the target's host) and
    returns the bytes written; ``bucket`` caps the bandwidth.
    """

    def __init__(self, source: Path, generations: Path, write: Callable[[BlockBatch], int],
                 bucket: TokenBucket | None = None) -> None:
        self.source, self.generations = source, generations
        self.write = write
        self.bucket = bucket
        self.before = read_generations(generations)
        self.pending = np.empty(0, dtype=np.intp)
        self.bytes_sent = 0  # on the wire, all passes

    def collect(self) -> int:
        """Add the blocks written since the last snapshot to those to send; returns the bytes
        to send."""
        now = read_generations(self.generations)
        self.pending = dirty_pages(self.before, now, pending=self.pending)
        self.before = now
        return len(self.pending) * DISK_BLOCK

    def send(self, on_batch: Callable[[int], None] | None = None) -> BlockPass:
        """Send the blocks collected, as they are now, paced by the bandwidth cap; ``on_batch``
        is told the bytes each batch took on the wire and may raise to stop the pass."""
        started = time.perf_counter()
        blocks, size, wire = len(self.pending), 0, 0
        for batch in read_blocks(self.source, DISK_BLOCK, self.pending):
            if self.bucket is not None:
                self.bucket.acquire(batch.wire_bytes)
            size += self.write(batch)
            wire += batch.wire_bytes
            self.bytes_sent += batch.wire_bytes
            if on_batch is not None:
                on_batch(batch.wire_bytes)
        self.pending = np.empty(0, dtype=np.intp)
        return BlockPass(blocks, size, wire, time.perf_counter() - started)

    def finish(self) -> BlockPass:
        """Once the guest is paused: send every block written since the last pass."""
        self.collect()
        return self.send()
