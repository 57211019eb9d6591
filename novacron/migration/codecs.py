"""The wire format of migrated blocks and pages, and the choice of compression.

A batch is ``MAGIC`` followed by frames; a frame is a 13-byte header (block or page index as
u64, kind as u8, payload length as u32, little endian) and its payload:

==============  ==========================================================================
kind            payload
==============  ==========================================================================
ZERO            nothing: the block is all zeros (never sent)
RAW             the block as is
ZSTD            the block compressed with zstd
XBZRLE          a run-length delta against the receiver's current copy (see ``xbzrle``)
XBZRLE_ZSTD     the same delta, compressed with zstd
LOCAL_COPY      a ``Location`` plus the xxh3 digest: the receiver already holds the bytes
==============  ==========================================================================
"""

from __future__ import annotations

import enum
import mmap
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import zstandard

from novacron.errors import InvalidRequest
from novacron.migration import xbzrle
from novacron.migration.blocks import DIGEST_SIZE, is_zero
from novacron.migration.xbzrle import PageCache

MAGIC = b"NCF1"
_HEADER = struct.Struct("<QBI")
_LOCATION = struct.Struct("<IQ")
HEADER_SIZE = _HEADER.size
NO_COMPRESSION = 0

# (minimum bandwidth in bytes/s, zstd level): a link faster than one zstd stream at that level
# compresses is better served by a cheaper level; a slow WAN link is worth more CPU per byte.
_LEVELS: tuple[tuple[float, int], ...] = (
    (2.0e9, NO_COMPRESSION),
    (2.0e8, 1),
    (5.0e7, 3),
    (1.25e7, 6),
    (0.0, 9),
)


class FrameKind(enum.IntEnum):
    ZERO = 0
    RAW = 1
    ZSTD = 2
    XBZRLE = 3
    XBZRLE_ZSTD = 4
    LOCAL_COPY = 5


@dataclass(frozen=True)
class Location:
    """Where a receiver already holds a block: ``source`` 0 is the image being written, ``k`` > 0
    the k-th seed (an earlier copy, a template image); ``block`` is the block index there."""

    source: int
    block: int


@dataclass(frozen=True)
class Frame:
    index: int
    kind: FrameKind
    payload: bytes | memoryview


def choose_zstd_level(bandwidth: float | None) -> int:
    """The zstd level for a link of ``bandwidth`` bytes/s (0: don't compress; None: unknown)."""
    if bandwidth is None:
        return 1
    if bandwidth <= 0:
        raise InvalidRequest("bandwidth must be positive", details={"bandwidth": bandwidth})
    return next(level for floor, level in _LEVELS if bandwidth >= floor)


def frame_header(index: int, kind: FrameKind, payload_len: int) -> bytes:
    return _HEADER.pack(index, kind, payload_len)


def local_copy_payload(location: Location, digest: bytes) -> bytes:
    return _LOCATION.pack(location.source, location.block) + digest


def parse_local_copy(payload: bytes | memoryview) -> tuple[Location, bytes]:
    source, block = _LOCATION.unpack_from(payload)
    return Location(source, block), bytes(payload[_LOCATION.size : _LOCATION.size + DIGEST_SIZE])


class BlockEncoder:
    """Turns blocks into frames: zero elision, then zstd when it saves bytes, else raw."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.compressor = zstandard.ZstdCompressor(level=level) if level != NO_COMPRESSION else None

    def encode(self, index: int, data: bytes | memoryview) -> bytes:
        """One frame (header and payload) for a block."""
        if is_zero(data):
            return frame_header(index, FrameKind.ZERO, 0)
        return self.encode_nonzero(index, data)

    def encode_nonzero(self, index: int, data: bytes | memoryview) -> bytes:
        """One ZSTD or RAW frame for a block known not to be all zeros."""
        if self.compressor is not None:
            packed = self.compressor.compress(data)
            if len(packed) < len(data):
                return frame_header(index, FrameKind.ZSTD, len(packed)) + packed
        return frame_header(index, FrameKind.RAW, len(data)) + bytes(data)


class BlockDecoder:
    """Decodes the payloads of self-contained frames (ZERO, RAW, ZSTD) back into blocks."""

    def __init__(self) -> None:
        self._zstd = zstandard.ZstdDecompressor()

    def decode(self, frame: Frame, length: int) -> bytes:
        """The ``length`` bytes a ZERO, RAW or ZSTD frame stands for."""
        if frame.kind is FrameKind.ZERO:
            return bytes(length)
        if frame.kind is FrameKind.RAW:
            data = bytes(frame.payload)
        elif frame.kind is FrameKind.ZSTD:
            data = self._zstd.decompress(frame.payload, max_output_size=length)
        else:
            raise InvalidRequest(
                "frame is not self-contained",
                details={"kind": frame.kind.name, "index": frame.index},
            )
        if len(data) != length:
            raise InvalidRequest(
                "frame has the wrong length",
                details={"index": frame.index, "expected": length, "got": len(data)},
            )
        return data


def iter_frames(batch: bytes | memoryview) -> Iterator[Frame]:
    """The frames of a batch, in order; payloads are views into the batch."""
    view = memoryview(batch)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise InvalidRequest("not a NovaCron frame batch")
    pos = len(MAGIC)
    while pos < len(view):
        if pos + HEADER_SIZE > len(view):
            raise InvalidRequest("truncated frame header", details={"offset": pos})
        index, kind, length = _HEADER.unpack_from(view, pos)
        pos += HEADER_SIZE
        if pos + length > len(view):
            raise InvalidRequest("truncated frame payload", details={"offset": pos, "index": index})
        try:
            frame_kind = FrameKind(kind)
        except ValueError:
            raise InvalidRequest("unknown frame kind", details={"kind": kind}) from None
        yield Frame(index, frame_kind, view[pos : pos + length])
        pos += length


class PageEncoder:
    """Sender side of a memory stream: zero pages elided, pages sent again as XBZRLE deltas
    against the last-sent version kept in a bounded cache, the rest as zstd or raw."""

    def __init__(self, level: int, cache: PageCache, page_size: int = 4096) -> None:
        self._blocks = BlockEncoder(level)
        self.cache = cache
        self.page_size = page_size
        self.zero_pages = 0  # zero frames encoded so far

    def encode_pages(
        self,
        memory: bytes | bytearray | memoryview | mmap.mmap,
        pages: Iterable[int],
        *,
        resend: bool,
    ) -> bytes:
        """A batch of frames for ``pages`` of ``memory`` (for instance the dirty log's pages),
        the same as :meth:`encode` page by page; zero pages are found, and the deltas of pages
        sent again computed (:func:`xbzrle.encode_batch`), for the whole batch at once."""
        index = np.fromiter(pages, dtype=np.intp)
        size = self.page_size
        with memoryview(memory) as view:
            whole = np.frombuffer(view, dtype=np.uint8)
            rows = whole.reshape(-1, size)[index]
            del whole  # release the view before it closes
        words = rows.view(np.uint64) if size % 8 == 0 else rows
        zero: npt.NDArray[np.bool_] = np.logical_not(words.any(axis=1))
        self.zero_pages += int(zero.sum())
        deltas: dict[int, bytes | None] = {}
        if resend:
            cached = [(n, i, old) for n, i in enumerate(index.tolist())
                      if not zero[n] and (old := self.cache.get(i)) is not None]
            if cached:
                olds = np.frombuffer(b"".join(old for _, _, old in cached), dtype=np.uint8)
                found = xbzrle.encode_batch(olds.reshape(-1, size),
                                            rows[[n for n, _, _ in cached]])
                deltas = dict(zip((i for _, i, _ in cached), found, strict=True))
        frames = []
        for n, i in enumerate(index.tolist()):
            if zero[n]:
                self.cache.discard(i)
                frames.append(frame_header(i, FrameKind.ZERO, 0))
            elif not resend:
                self.cache.discard(i)
                frames.append(self._blocks.encode_nonzero(i, rows[n].data))
            else:
                frames.append(self._resend(i, rows[n].tobytes(), deltas))
        return make_batch(frames)

    def encode(self, index: int, page: bytes, *, resend: bool) -> bytes:
        """One frame for ``page``; ``resend`` is False during the first (bulk) pass, whose pages
        are not cached (as in QEMU, only pages dirtied again are worth the cache)."""
        if is_zero(page):
            self.cache.discard(index)
            self.zero_pages += 1
            return frame_header(index, FrameKind.ZERO, 0)
        if not resend:
            self.cache.discard(index)
            return self._blocks.encode_nonzero(index, page)
        return self._resend(index, page, {})

    def _resend(self, index: int, page: bytes, deltas: dict[int, bytes | None]) -> bytes:
        """The frame of a non-zero page sent again (``deltas``: against the cached versions,
        where found already); the page becomes the cached version."""
        previous = self.cache.get(index)
        self.cache.put(index, page)
        if previous is None:
            delta = None
        else:
            delta = deltas[index] if index in deltas else xbzrle.encode(previous, page)
        if delta is None:
            return self._blocks.encode_nonzero(index, page)
        kind = FrameKind.XBZRLE
        zstd = self._blocks.compressor
        if zstd is not None:
            packed = zstd.compress(delta)
            if len(packed) < len(delta):
                delta, kind = packed, FrameKind.XBZRLE_ZSTD
        return frame_header(index, kind, len(delta)) + delta


class PageDecoder:
    """Receiver side of a memory stream: applies frames to the pages of a writable buffer."""

    def __init__(self, memory: bytearray | memoryview, page_size: int) -> None:
        self.memory = memoryview(memory)
        self.page_size = page_size
        self._blocks = BlockDecoder()
        self._zstd = zstandard.ZstdDecompressor()

    def apply_batch(self, batch: bytes | memoryview) -> int:
        """Apply every frame of a batch; returns how many pages it held."""
        count = 0
        for frame in iter_frames(batch):
            self.apply(frame)
            count += 1
        return count

    def apply(self, frame: Frame) -> None:
        start = frame.index * self.page_size
        page = self.memory[start : start + self.page_size]
        if len(page) != self.page_size:
            raise InvalidRequest("page index out of range", details={"index": frame.index})
        if frame.kind is FrameKind.XBZRLE:
            xbzrle.decode(frame.payload, page)
        elif frame.kind is FrameKind.XBZRLE_ZSTD:
            delta = self._zstd.decompress(frame.payload, max_output_size=self.page_size)
            xbzrle.decode(delta, page)
        else:
            page[:] = self._blocks.decode(frame, self.page_size)


def make_batch(frames: Iterable[bytes]) -> bytes:
    """A batch of encoded frames."""
    return MAGIC + b"".join(frames)
