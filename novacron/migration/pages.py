"""Guest memory pages on their way from a source memory file to a target one (pre-copy's data).

A :class:`PageReader` on the source turns pages into batches; a :class:`PageWriter` on the target
applies them. A batch is either :class:`RawPages` (zero pages as bare indices, the others as one
array: cheap to build and, through Ray's object store, to ship without a copy) or, with
compression or XBZRLE, :class:`FramePages` (frames of :mod:`novacron.migration.codecs`: zero
pages as headers, the others zstd-compressed or, when sent again, as deltas against the version
sent last). :func:`send_pages` runs one pass, each batch paced by an optional token bucket on the
bytes it puts on the wire. Between two Ray nodes batches travel through the object store
(``actors/migration/stream.py``); on one node the writer is called in process, so a pass is the
plain page copy it always was. Pure numpy, no Ray.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

from novacron.errors import InvalidRequest
from novacron.migration.codecs import NO_COMPRESSION, PageDecoder, PageEncoder
from novacron.migration.throttle import TokenBucket
from novacron.migration.xbzrle import PageCache

PAGE_SIZE = 4096
BATCH_PAGES = 2048  # 8 MiB of guest memory per batch
XBZRLE_CACHE_BYTES = 64 * 1024 * 1024  # QEMU's default XBZRLE cache size
_INDEX_BYTES = 8  # a page index on the wire


@dataclass(frozen=True)
class RawPages:
    """Pages as they are: ``zero`` are all-zero pages (only their indices travel), ``data`` holds
    the pages ``index`` (one row each)."""

    zero: npt.NDArray[np.int64]
    index: npt.NDArray[np.int64]
    data: npt.NDArray[np.uint8]

    @property
    def pages(self) -> int:
        return len(self.zero) + len(self.index)

    @property
    def zero_pages(self) -> int:
        return len(self.zero)

    @property
    def wire_bytes(self) -> int:
        return _INDEX_BYTES * self.pages + self.data.nbytes


@dataclass(frozen=True)
class FramePages:
    """Pages as one batch of codec frames (see :mod:`novacron.migration.codecs`)."""

    frames: bytes
    pages: int
    zero_pages: int

    @property
    def wire_bytes(self) -> int:
        return len(self.frames)


PageBatch = RawPages | FramePages


@dataclass(frozen=True)
class PassResult:
    """What one pass moved: pages, their bytes of guest memory, the bytes put on the wire for
    them, how many were zero pages (sent as indices only) and how long it took."""

    pages: int
    bytes: int
    wire_bytes: int
    zero_pages: int
    seconds: float

    @property
    def rate(self) -> float:
        """Guest memory moved per second (0 for an empty pass)."""
        return self.bytes / self.seconds if self.seconds > 0 and self.bytes else 0.0


class PageReader:
    """The source side: maps a memory file read-only and encodes batches of its pages.

    Without ``compress`` or ``xbzrle`` batches are :class:`RawPages`, their zero pages as bare
    indices unless ``elide_zero`` is off (file to file on one node, where testing every page
    costs more than copying the few zero ones). With ``compress`` pages go through zstd at
    ``level``; with ``xbzrle`` a page sent again goes as a delta against the version sent last,
    kept in a cache of ``cache_bytes`` (pages of the first pass, sent with ``resend=False``, are
    not cached, as in QEMU).
    """

    def __init__(self, path: str | os.PathLike[str], *, compress: bool = False,
                 xbzrle: bool = False, level: int = 1, elide_zero: bool = True,
                 cache_bytes: int = XBZRLE_CACHE_BYTES) -> None:
        self.xbzrle = xbzrle
        self.elide_zero = elide_zero
        self.encoder = (PageEncoder(level if compress else NO_COMPRESSION,
                                    PageCache(cache_bytes if xbzrle else 0), PAGE_SIZE)
                        if compress or xbzrle else None)
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pages = np.frombuffer(self._map, dtype=np.uint8).reshape(-1, PAGE_SIZE)

    def encode(self, pages: npt.NDArray[np.integer], *, resend: bool) -> PageBatch:
        """One batch holding ``pages`` as they are now; ``resend``: they were sent before."""
        if self.encoder is None:
            data = self._pages[pages]
            index = np.asarray(pages, dtype=np.int64)
            nonzero = data.view(np.uint64).any(axis=1) if self.elide_zero else None
            if nonzero is None or nonzero.all():
                return RawPages(np.empty(0, np.int64), index, data)
            return RawPages(index[~nonzero], index[nonzero], data[nonzero])
        zero = self.encoder.zero_pages
        frames = self.encoder.encode_pages(self._map, pages.tolist(),
                                           resend=resend and self.xbzrle)
        return FramePages(frames, len(pages), self.encoder.zero_pages - zero)

    def close(self) -> None:
        del self._pages  # release the buffer before the mapping closes
        self._map.close()

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class PageWriter:
    """The target side: maps a memory file and applies batches to it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self._pages = np.frombuffer(self._map, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        self._view = memoryview(self._map)
        self._decoder = PageDecoder(self._view, PAGE_SIZE)

    def apply(self, batch: PageBatch) -> int:
        """Write one batch's pages; returns how many it held."""
        if isinstance(batch, FramePages):
            count = self._decoder.apply_batch(batch.frames)
        else:
            count = batch.pages
            for index in (batch.index, batch.zero):
                if len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(self._pages):
                    raise InvalidRequest("page index out of range",
                                         details={"pages": len(self._pages)})
            self._pages[batch.index] = batch.data
            self._pages[batch.zero] = 0
        if count != batch.pages:
            raise InvalidRequest("a page batch holds fewer pages than it says",
                                 details={"expected": batch.pages, "got": count})
        return count

    def close(self) -> None:
        self._decoder.memory.release()
        self._view.release()
        del self._pages, self._decoder  # release the buffers before the mapping closes
        self._map.close()

    def __enter__(self) -> PageWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def send_pages(reader: PageReader, pages: npt.NDArray[np.integer],
               sink: Callable[[PageBatch], object], *, resend: bool,
               bucket: TokenBucket | None = None,
               on_batch: Callable[[int], None] | None = None,
               flush: Callable[[], None] | None = None) -> PassResult:
    """One pass: encode ``pages`` in batches of ``BATCH_PAGES`` and hand each to ``sink``.

    The bucket is charged with each batch's wire bytes before it is handed on; ``on_batch`` is
    told them after, and an exception it raises (a cancel) ends the pass. ``flush`` is called at
    the end to wait until the receiver has applied everything (the pass's time includes it).
    """
    started = time.perf_counter()
    done = wire = zero = 0
    for start in range(0, len(pages), BATCH_PAGES):
        batch = reader.encode(pages[start:start + BATCH_PAGES], resend=resend)
        if bucket is not None:
            bucket.acquire(batch.wire_bytes)
        sink(batch)
        done += batch.pages
        wire += batch.wire_bytes
        zero += batch.zero_pages
        if on_batch is not None:
            on_batch(batch.wire_bytes)  # may raise to stop the pass
    if flush is not None:
        flush()
    return PassResult(done, done * PAGE_SIZE, wire, zero, time.perf_counter() - started)


def memory_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE2b digest of a memory file's bytes (to check a switchover moved them all)."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()
