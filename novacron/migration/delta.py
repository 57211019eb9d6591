"""Delta sync of one image onto an older copy: plan, encode, apply, verify, checkpoint.

The steps of a sync, each a plain function over files so that any executor (Ray tasks in
``actors/sync_tasks.py``, or a loop in a test) can run them per range:

1. both hosts ``hash_range`` their image (``blocks``);
2. ``BlockIndex`` maps the digests of blocks the target already holds (its own image, seeds such
   as an earlier copy or the template the image came from) to where they are;
3. ``plan_range`` compares a range's digests: changed blocks become zero writes, local copies or
   blocks to send;
4. the source encodes the plan into a frame batch (``encode_range``, frames from ``codecs``);
5. the target applies it in place (``apply_batch``), reads the written blocks back and
   recomputes the range's BLAKE3 digest, which must equal the source's. A local copy whose bytes
   were overwritten meanwhile (the image is written in place) is a miss, sent in a new batch.

A ``SyncCheckpoint`` records the verified ranges so an interrupted sync resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from novacron.errors import InvalidRequest
from novacron.migration.blocks import (
    DIGEST_SIZE,
    LEAF_SIZE,
    Geometry,
    RangeHashes,
    block_leaf,
    image_digest,
    range_digest,
)
from novacron.migration.codecs import (
    BlockDecoder,
    BlockEncoder,
    FrameKind,
    Location,
    frame_header,
    iter_frames,
    local_copy_payload,
    make_batch,
    parse_local_copy,
)

log = logging.getLogger("novacron.migration")

IMAGE = 0  # Location.source of the image being written; seeds are numbered from 1


class BlockIndex:
    """Digest -> location of the non-zero blocks a target holds. Seeds are never written during
    a sync, so a block found in a seed is copied from there rather than from the image."""

    def __init__(self) -> None:
        self._seeds: dict[bytes, tuple[int, int]] = {}
        self._image: dict[bytes, int] = {}

    def __len__(self) -> int:
        return len(self._seeds.keys() | self._image.keys())

    def add(self, source: int, hashes: RangeHashes) -> None:
        """Index the non-zero blocks of a range of the image (``IMAGE``) or of seed ``source``."""
        digests, first = hashes.digests, hashes.first_block
        nonzero = np.flatnonzero(~hashes.zero_mask()).tolist()
        keys = [digests[i * DIGEST_SIZE : (i + 1) * DIGEST_SIZE] for i in nonzero]
        if source == IMAGE:
            self._image.update(zip(keys, [first + i for i in nonzero], strict=True))
        else:
            self._seeds.update(zip(keys, [(source, first + i) for i in nonzero], strict=True))

    def get(self, digest: bytes) -> Location | None:
        seed = self._seeds.get(digest)
        if seed is not None:
            return Location(*seed)
        block = self._image.get(digest)
        return Location(IMAGE, block) if block is not None else None


@dataclass(frozen=True)
class RangePlan:
    """What moves for one range: blocks to zero, to copy from where the target holds them, and to
    send; ``digests`` has the source's xxh3 digest of every block that is copied."""

    range_index: int
    zero: tuple[int, ...] = ()
    copy: tuple[tuple[int, Location], ...] = ()
    send: tuple[int, ...] = ()
    digests: dict[int, bytes] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.zero or self.copy or self.send)


def _changed(src: RangeHashes, dst: RangeHashes) -> np.ndarray[Any, np.dtype[np.intp]]:
    a = np.frombuffer(src.digests, dtype=np.uint64).reshape(-1, 2)
    b = np.frombuffer(dst.digests, dtype=np.uint64).reshape(-1, 2)
    return np.flatnonzero((a != b).any(axis=1))


def plan_range(src: RangeHashes, dst: RangeHashes, index: BlockIndex | None = None) -> RangePlan:
    """Compare one range of source and target and decide how each changed block moves."""
    if (src.range_index, src.n_blocks) != (dst.range_index, dst.n_blocks):
        raise InvalidRequest(
            "source and target ranges differ",
            details={"source": src.range_index, "target": dst.range_index},
        )
    zero_mask = src.zero_mask()
    zero: list[int] = []
    copy: list[tuple[int, Location]] = []
    send: list[int] = []
    digests: dict[int, bytes] = {}
    for i in _changed(src, dst).tolist():
        block = src.first_block + i
        if zero_mask[i]:
            zero.append(block)
            continue
        digest = src.digest_of(block)
        where = index.get(digest) if index is not None else None
        if where is None:
            send.append(block)
        else:
            copy.append((block, where))
            digests[block] = digest
    return RangePlan(src.range_index, tuple(zero), tuple(copy), tuple(send), digests)


@dataclass(frozen=True)
class EncodeStats:
    """What a batch holds: its size in bytes and its frames by kind."""

    size: int
    kinds: dict[str, int]
    bytes_read: int


def encode_range(
    path: str | os.PathLike[str], geometry: Geometry, plan: RangePlan, level: int
) -> tuple[bytes, EncodeStats]:
    """The frame batch for a plan, reading only the blocks to send from the source image."""
    encoder = BlockEncoder(level)
    frames: list[bytes] = []
    # Local copies first: within a batch they read the image before its other frames write it.
    for block, where in plan.copy:
        payload = local_copy_payload(where, plan.digests[block])
        frames.append(frame_header(block, FrameKind.LOCAL_COPY, len(payload)) + payload)
    frames.extend(frame_header(block, FrameKind.ZERO, 0) for block in plan.zero)
    bytes_read = 0
    if plan.send:
        fd = os.open(path, os.O_RDONLY)
        try:
            for block in plan.send:
                offset, length = geometry.block_extent(block)
                data = os.pread(fd, length, offset)
                if len(data) != length:
                    raise InvalidRequest(
                        "source image shrank during the sync", details={"block": block}
                    )
                bytes_read += length
                frames.append(encoder.encode(block, data))
        finally:
            os.close(fd)
    batch = make_batch(frames)
    kinds = Counter(FrameKind(frame[8]).name for frame in frames)
    return batch, EncodeStats(len(batch), dict(kinds), bytes_read)


@dataclass(frozen=True)
class ApplyResult:
    """The outcome of applying one batch to one range of the target."""

    range_index: int
    leaves: bytes
    digest: bytes
    written: int
    misses: tuple[int, ...]


def apply_batch(
    path: str | os.PathLike[str],
    geometry: Geometry,
    range_index: int,
    batch: bytes | memoryview,
    leaves: bytes,
    seeds: Sequence[str | os.PathLike[str]] = (),
) -> ApplyResult:
    """Write a batch into range ``range_index`` of the target image in place.

    ``leaves`` are the range's BLAKE3 leaves before the batch; the written blocks are read back
    and their leaves replaced, giving the range's new digest. The writes go to disk in the
    background: flush the image before recording the range in a checkpoint.
    """
    blocks = geometry.range_blocks_of(range_index)
    if len(leaves) != len(blocks) * LEAF_SIZE:
        raise InvalidRequest("leaves do not match the range", details={"range": range_index})
    new_leaves = bytearray(leaves)
    decoder = BlockDecoder()
    written: list[int] = []
    misses: list[int] = []
    fds: dict[int, int] = {}
    fd = os.open(path, os.O_RDWR)
    fds[IMAGE] = fd
    try:
        for frame in iter_frames(batch):
            if frame.index not in blocks:
                raise InvalidRequest(
                    "frame outside its range", details={"range": range_index, "block": frame.index}
                )
            offset, length = geometry.block_extent(frame.index)
            if frame.kind is FrameKind.LOCAL_COPY:
                where, digest = parse_local_copy(frame.payload)
                data = _read_location(fds, seeds, geometry.block_size, where, length)
                if xxhash.xxh3_128_digest(data) != digest:
                    misses.append(frame.index)
                    continue
            else:
                data = decoder.decode(frame, length)
            os.pwrite(fd, data, offset)
            written.append(frame.index)
        for block in written:
            offset, length = geometry.block_extent(block)
            i = (block - blocks.start) * LEAF_SIZE
            new_leaves[i : i + LEAF_SIZE] = block_leaf(os.pread(fd, length, offset))
            # Start writing the block to disk now, so that the flush before the next checkpoint
            # has little left to wait for (DONTNEED starts write-back of dirty pages).
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    finally:
        for handle in fds.values():
            os.close(handle)
    if misses:
        log.debug("range %d: %d local copies overwritten meanwhile", range_index, len(misses))
    leaf_bytes = bytes(new_leaves)
    digest = range_digest(leaf_bytes)
    return ApplyResult(range_index, leaf_bytes, digest, len(written), tuple(misses))


def _read_location(
    fds: dict[int, int],
    seeds: Sequence[str | os.PathLike[str]],
    block_size: int,
    where: Location,
    length: int,
) -> bytes:
    if where.source not in fds:
        if not 1 <= where.source <= len(seeds):
            raise InvalidRequest("local copy from an unknown seed", details={"seed": where.source})
        fds[where.source] = os.open(seeds[where.source - 1], os.O_RDONLY)
    return os.pread(fds[where.source], length, where.block * block_size)


@dataclass
class SyncCheckpoint:
    """The ranges of a sync already applied and verified, with their BLAKE3 digests.

    Serialisable to JSON so the owner of a migration can store it and resume an interrupted
    sync with it. When the source image changes after a range was verified (a running guest),
    ``invalidate`` the changed bytes before resuming.
    """

    geometry: Geometry
    done: dict[int, bytes] = field(default_factory=dict)

    def mark_done(self, range_index: int, digest: bytes) -> None:
        self.done[range_index] = digest

    def pending(self) -> list[int]:
        return [r for r in range(self.geometry.n_ranges) if r not in self.done]

    @property
    def complete(self) -> bool:
        return len(self.done) == self.geometry.n_ranges

    def invalidate(self, extents: Iterable[tuple[int, int]]) -> None:
        """Forget the ranges touching any of the (offset, length) byte extents."""
        span = self.geometry.range_size
        for offset, length in extents:
            if length > 0:
                for r in range(offset // span, (offset + length - 1) // span + 1):
                    self.done.pop(r, None)

    def image_digest(self) -> bytes:
        """The verified BLAKE3 digest of the whole image (only once complete)."""
        if not self.complete:
            raise InvalidRequest("sync is not complete", details={"pending": len(self.pending())})
        return image_digest(self.geometry, [self.done[r] for r in range(self.geometry.n_ranges)])

    def to_json(self) -> str:
        done = {str(r): digest.hex() for r, digest in sorted(self.done.items())}
        return json.dumps({"version": 1, "geometry": self.geometry.to_dict(), "done": done})

    @classmethod
    def from_json(cls, text: str) -> SyncCheckpoint:
        try:
            data = json.loads(text)
            if data.get("version") != 1:
                raise InvalidRequest(
                    "unknown checkpoint version", details={"version": data.get("version")}
                )
            geometry = Geometry.from_dict(data["geometry"])
            done = {int(r): bytes.fromhex(digest) for r, digest in data["done"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidRequest("malformed sync checkpoint", details={"error": str(exc)}) from exc
        if any(not 0 <= r < geometry.n_ranges for r in done):
            raise InvalidRequest("checkpoint names ranges outside its image")
        return cls(geometry, done)


@dataclass
class SyncReport:
    """What a sync did. ``bytes_sent`` goes source -> target (frames, range digests),
    ``bytes_received`` target -> source (the target's block digests)."""

    geometry: Geometry
    zstd_level: int
    ranges: int = 0
    ranges_resumed: int = 0
    ranges_unverified: list[int] = field(default_factory=list)
    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    blocks: dict[str, int] = field(default_factory=dict)
    blocks_unchanged: int = 0
    misses: int = 0
    duration_s: float = 0.0
    image_digest: str | None = None

    @property
    def verified(self) -> bool:
        """Whether the whole target image now has the source's BLAKE3 image digest."""
        return self.image_digest is not None

    @property
    def bytes_moved(self) -> int:
        return self.bytes_sent + self.bytes_received

    def to_dict(self) -> dict[str, Any]:
        return {
            "geometry": self.geometry.to_dict(),
            "zstd_level": self.zstd_level,
            "ranges": self.ranges,
            "ranges_resumed": self.ranges_resumed,
            "ranges_unverified": list(self.ranges_unverified),
            "bytes_read": self.bytes_read,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "blocks": dict(self.blocks),
            "blocks_unchanged": self.blocks_unchanged,
            "misses": self.misses,
            "duration_s": self.duration_s,
            "image_digest": self.image_digest,
            "verified": self.verified,
        }
