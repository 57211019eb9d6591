"""Block geometry of an image and the digests of its blocks.

An image is cut into fixed blocks (64 KiB to 4 MiB, chosen from its size) and the blocks are
grouped into ranges, the unit of parallel work and of checkpoints. Each block gets two digests
in one read: an xxh3-128 digest (16 bytes; compared across hosts to find changed blocks and
blocks the target already holds) and a BLAKE3 leaf (32 bytes; never shipped). A range's BLAKE3
digest covers its leaves and the image digest covers the range digests, so source and target
each verify their whole image with BLAKE3 while reading it only once.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from functools import cache
from typing import Any

import blake3
import numpy as np
import numpy.typing as npt
import xxhash

from novacron.errors import InvalidRequest

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MIN_BLOCK_SIZE = 64 * KiB
MAX_BLOCK_SIZE = 4 * MiB
TARGET_BLOCKS = 1 << 17  # about 2 MiB of digests per image, whatever its size
TARGET_RANGES = 16  # per image: enough to keep a few hosts' cores busy ...
MIN_RANGE_BYTES = 8 * MiB  # ... without tasks so small that scheduling them costs more
MAX_RANGE_BYTES = 128 * MiB
DIGEST_SIZE = 16  # xxh3-128
LEAF_SIZE = 32  # BLAKE3

_IMAGE_DIGEST_TAG = b"novacron.image.v1"


def choose_block_size(image_size: int) -> int:
    """The power-of-two block size giving about TARGET_BLOCKS blocks, within 64 KiB..4 MiB."""
    if image_size < 0:
        raise InvalidRequest("image size must not be negative", details={"size": image_size})
    wanted = -(-image_size // TARGET_BLOCKS)
    size = MIN_BLOCK_SIZE
    while size < wanted and size < MAX_BLOCK_SIZE:
        size *= 2
    return size


@dataclass(frozen=True)
class Geometry:
    """How an image of ``image_size`` bytes is cut into blocks and ranges of blocks."""

    image_size: int
    block_size: int
    range_blocks: int

    def __post_init__(self) -> None:
        bs = self.block_size
        aligned = bs > 0 and bs % mmap.ALLOCATIONGRANULARITY == 0
        if self.image_size < 0 or not aligned or self.range_blocks < 1:
            raise InvalidRequest("invalid block geometry", details=self.to_dict())

    @classmethod
    def for_size(cls, image_size: int, block_size: int | None = None) -> Geometry:
        """The default geometry for an image: block size by size, ranges of 8..128 MiB."""
        bs = block_size if block_size is not None else choose_block_size(image_size)
        span = MIN_RANGE_BYTES
        while span * TARGET_RANGES < image_size and span < MAX_RANGE_BYTES:
            span *= 2
        return cls(image_size, bs, max(1, span // bs))

    @property
    def n_blocks(self) -> int:
        return -(-self.image_size // self.block_size)

    @property
    def range_size(self) -> int:
        return self.block_size * self.range_blocks

    @property
    def n_ranges(self) -> int:
        return -(-self.n_blocks // self.range_blocks)

    def range_blocks_of(self, r: int) -> range:
        """The block indices of range ``r``."""
        first = r * self.range_blocks
        return range(first, min(first + self.range_blocks, self.n_blocks))

    def range_extent(self, r: int) -> tuple[int, int]:
        """(offset, length) of range ``r``; only the last range may be short."""
        offset = r * self.range_size
        return offset, max(0, min(self.range_size, self.image_size - offset))

    def block_extent(self, block: int) -> tuple[int, int]:
        """(offset, length) of a block; only the last block may be short."""
        offset = block * self.block_size
        return offset, min(self.block_size, self.image_size - offset)

    def to_dict(self) -> dict[str, int]:
        return {
            "image_size": self.image_size,
            "block_size": self.block_size,
            "range_blocks": self.range_blocks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Geometry:
        return cls(int(data["image_size"]), int(data["block_size"]), int(data["range_blocks"]))


@cache
def zero_digest(length: int) -> bytes:
    """xxh3-128 digest of ``length`` zero bytes."""
    return xxhash.xxh3_128_digest(bytes(length))


@cache
def zero_leaf(length: int) -> bytes:
    """BLAKE3 leaf of ``length`` zero bytes."""
    return blake3.blake3(bytes(length)).digest()


def block_leaf(data: bytes | memoryview) -> bytes:
    """BLAKE3 leaf of one block (the verification digest)."""
    return blake3.blake3(data).digest()


def is_zero(data: bytes | memoryview) -> bool:
    """Whether a buffer is all zero bytes (vectorised, 8 bytes at a time when it can)."""
    if len(data) % 8 == 0:
        return not np.frombuffer(data, dtype=np.uint64).any()
    return not np.frombuffer(data, dtype=np.uint8).any()


def range_digest(leaves: bytes) -> bytes:
    """BLAKE3 digest of one range from its concatenated block leaves."""
    return blake3.blake3(leaves).digest()


def image_digest(geometry: Geometry, range_digests: list[bytes]) -> bytes:
    """BLAKE3 digest of a whole image from its range digests, in range order."""
    if len(range_digests) != geometry.n_ranges:
        raise InvalidRequest(
            "one digest per range is needed",
            details={"ranges": geometry.n_ranges, "digests": len(range_digests)},
        )
    header = struct.pack("<QQQ", geometry.image_size, geometry.block_size, geometry.range_blocks)
    return blake3.blake3(_IMAGE_DIGEST_TAG + header + b"".join(range_digests)).digest()


@dataclass(frozen=True)
class RangeHashes:
    """Digests of one range of an image: what a hashing task returns.

    ``digests`` holds the blocks' xxh3-128 digests back to back and ``zero`` a packed bitmap of
    the all-zero blocks; both travel to the planner. ``leaves`` (the BLAKE3 leaves) stays on the
    host that read the range; ``digest`` is the range's BLAKE3 digest.
    """

    range_index: int
    first_block: int
    digests: bytes
    zero: bytes
    leaves: bytes
    digest: bytes

    @property
    def n_blocks(self) -> int:
        return len(self.digests) // DIGEST_SIZE

    def zero_mask(self) -> npt.NDArray[np.bool_]:
        bits = np.unpackbits(np.frombuffer(self.zero, dtype=np.uint8), count=self.n_blocks)
        return bits.astype(np.bool_)

    def digest_of(self, block: int) -> bytes:
        i = (block - self.first_block) * DIGEST_SIZE
        return self.digests[i : i + DIGEST_SIZE]

    @property
    def wire_size(self) -> int:
        """Bytes this range's digests take when shipped to the other host."""
        return len(self.digests) + len(self.zero) + len(self.digest)


def _map_range(fd: int, geometry: Geometry, r: int) -> mmap.mmap:
    """Map range ``r`` of an open image read-only."""
    offset, length = geometry.range_extent(r)
    mapped = mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset)
    mapped.madvise(mmap.MADV_SEQUENTIAL)
    return mapped


def hash_range(
    path: str | os.PathLike[str], geometry: Geometry, r: int, *, strong: bool = True
) -> RangeHashes:
    """Read range ``r`` of an image once and compute its block digests, zero map and leaves.

    Zero blocks are found from their xxh3 digest (then confirmed), so they cost no BLAKE3 work.
    Without ``strong`` (an image only used as a source of local copies) no leaves are computed
    and ``leaves`` and ``digest`` are empty.
    """
    blocks = geometry.range_blocks_of(r)
    if not blocks:
        raise InvalidRequest("no such range", details={"range": r, **geometry.to_dict()})
    if os.path.getsize(path) < geometry.image_size:
        raise InvalidRequest(
            "image is shorter than its geometry", details={"path": str(path), "range": r}
        )
    digests: list[bytes] = []
    leaves: list[bytes] = []
    zero = np.zeros(len(blocks), dtype=np.bool_)
    bs = geometry.block_size
    xxh3, strong_hash = xxhash.xxh3_128_digest, blake3.blake3  # the loop runs per 64 KiB
    empty_digest, empty_leaf = zero_digest(bs), zero_leaf(bs)
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = _map_range(fd, geometry, r)
    finally:
        os.close(fd)
    with mapped:
        view = memoryview(mapped)
        data: memoryview | None = None
        try:
            for i in range(len(blocks)):
                data = view[i * bs : (i + 1) * bs]
                digest = xxh3(data)
                digests.append(digest)
                if len(data) != bs:  # the image's short last block
                    empty_digest, empty_leaf = zero_digest(len(data)), zero_leaf(len(data))
                if digest == empty_digest and is_zero(data):
                    zero[i] = True
                    if strong:
                        leaves.append(empty_leaf)
                elif strong:
                    leaves.append(strong_hash(data).digest())
        finally:
            data = None  # the last slice must go before the map can close
            view.release()
    leaf_bytes = b"".join(leaves)
    return RangeHashes(
        range_index=r,
        first_block=blocks.start,
        digests=b"".join(digests),
        zero=np.packbits(zero).tobytes(),
        leaves=leaf_bytes,
        digest=range_digest(leaf_bytes) if strong else b"",
    )


def file_image_digest(path: str | os.PathLike[str], geometry: Geometry | None = None) -> bytes:
    """The BLAKE3 image digest of a file (what a sync verifies), computed here in one pass."""
    geo = geometry if geometry is not None else Geometry.for_size(os.path.getsize(path))
    return image_digest(geo, [hash_range(path, geo, r).digest for r in range(geo.n_ranges)])
