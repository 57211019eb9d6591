"""Copying guest memory pages between two memory files (the pre-copy passes' data path).

Both files are mapped; a pass copies the given pages in batches, each batch paced by an optional
:class:`~novacron.migration.throttle.TokenBucket` and followed by a callback that may raise, so a
cancel is noticed within one batch. Pure numpy, no Ray.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from novacron.migration.throttle import TokenBucket

PAGE_SIZE = 4096
BATCH_PAGES = 2048  # 8 MiB per batch


@dataclass(frozen=True)
class PassResult:
    """What one pass copied and how long it took."""

    pages: int
    bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Bytes per second (0 for an empty pass)."""
        return self.bytes / self.seconds if self.seconds > 0 and self.bytes else 0.0


def copy_pages(src: str | os.PathLike[str], dst: str | os.PathLike[str],
               pages: npt.NDArray[np.intp], *, bucket: TokenBucket | None = None,
               on_batch: Callable[[int], None] | None = None) -> PassResult:
    """Copy ``pages`` (indices) of memory file ``src`` into ``dst`` (same size).

    ``on_batch`` is told the bytes of each batch copied; an exception it raises (a cancel) ends
    the pass.
    """
    started = time.perf_counter()
    done = 0
    if len(pages):
        with open(src, "rb") as fin, open(dst, "r+b") as fout, \
                mmap.mmap(fin.fileno(), 0, access=mmap.ACCESS_READ) as min_, \
                mmap.mmap(fout.fileno(), 0) as mout:
            source = np.frombuffer(min_, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            target = np.frombuffer(mout, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            try:
                for start in range(0, len(pages), BATCH_PAGES):
                    batch = pages[start:start + BATCH_PAGES]
                    if bucket is not None:
                        bucket.acquire(len(batch) * PAGE_SIZE)
                    target[batch] = source[batch]
                    done += len(batch)
                    if on_batch is not None:
                        on_batch(len(batch) * PAGE_SIZE)  # may raise to stop the pass
            finally:
                del source, target  # release the buffers before the mappings close
    return PassResult(done, done * PAGE_SIZE, time.perf_counter() - started)


def memory_digest(path: str | os.PathLike[str]) -> str:
    """BLAKE2b digest of a memory file's bytes (to check a switchover moved them all)."""
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()
