"""XBZRLE-like page deltas (as QEMU's) and the bounded cache of last-sent pages they need.

A page sent again is XORed with the version sent last time; the delta is the sequence of
(zero-run length, non-zero-run length, new bytes of that run) with both lengths as ULEB128, the
trailing zero run left out. The receiver applies it to the copy it holds: zero runs keep its bytes,
the other runs take the new ones. A delta that is not smaller than the page is refused.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import numpy as np
import numpy.typing as npt

from novacron.errors import InvalidRequest


@functools.lru_cache(maxsize=8192)
def _uleb128(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_uleb128(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise InvalidRequest("truncated XBZRLE delta")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def encode(old: bytes | memoryview, new: bytes | memoryview) -> bytes | None:
    """The delta turning ``old`` into ``new`` (same length), or None when not smaller than new."""
    if len(old) != len(new):
        raise InvalidRequest(
            "XBZRLE pages differ in length", details={"old": len(old), "new": len(new)}
        )
    new_arr = np.frombuffer(new, dtype=np.uint8)
    changed = np.frombuffer(old, dtype=np.uint8) != new_arr
    # Boundaries of the non-zero runs of old XOR new: starts where a change begins, ends after.
    edges = np.flatnonzero(np.diff(changed.view(np.int8), prepend=0, append=0))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) == 0:
        return b""
    zero_runs = starts - np.concatenate(([0], ends[:-1]))
    # Each run costs its bytes plus two lengths; bail out early if that reaches the page size.
    lengths = np.concatenate((zero_runs, ends - starts))
    varint_bytes = len(lengths) + sum(
        int(np.count_nonzero(lengths >= 1 << (7 * k))) for k in range(1, 5)
    )
    if varint_bytes + int((ends - starts).sum()) >= len(new):
        return None
    out = bytearray()
    new_bytes = new_arr.tobytes()
    for zrun, start, end in zip(zero_runs.tolist(), starts.tolist(), ends.tolist(), strict=True):
        out += _uleb128(zrun)
        out += _uleb128(end - start)
        out += new_bytes[start:end]
    return bytes(out)


def encode_batch(old: npt.NDArray[np.uint8], new: npt.NDArray[np.uint8]) -> list[bytes | None]:
    """:func:`encode` of each row pair of two (pages, page size) arrays, the runs of all found
    at once (for the many pages of one batch, far cheaper than page by page)."""
    if old.shape != new.shape or new.ndim != 2:
        raise InvalidRequest("XBZRLE batches differ in shape",
                             details={"old": list(old.shape), "new": list(new.shape)})
    count, size = new.shape
    changed = np.zeros((count, size + 2), dtype=np.int8)
    np.not_equal(old, new, out=changed[:, 1:-1].view(np.bool_))
    edges = np.diff(changed, axis=1).reshape(-1)  # +1 where a run of changes starts, -1 after
    where = np.flatnonzero(edges)
    rows, columns = np.divmod(where, size + 1)
    opening = edges[where] == 1
    rows, starts, ends = rows[opening], columns[opening], columns[~opening]
    runs = np.bincount(rows, minlength=count)
    first = np.concatenate(([0], np.cumsum(runs)))
    zero_runs = starts - np.concatenate(([0], ends[:-1]))
    zero_runs[first[:-1][runs > 0]] = starts[first[:-1][runs > 0]]  # a row's first run
    lengths = ends - starts
    cost = lengths + _varint_sizes(zero_runs) + _varint_sizes(lengths)
    refused = np.bincount(rows, weights=cost, minlength=count) >= size
    data = new.reshape(-1).tobytes()
    out: list[bytes | None] = []
    zero_list, start_list, end_list = zero_runs.tolist(), starts.tolist(), ends.tolist()
    bounds = first.tolist()
    for row, no in enumerate(refused.tolist()):
        if no:
            out.append(None)
            continue
        base, parts = row * size, list[bytes]()
        for run in range(bounds[row], bounds[row + 1]):
            parts += (_uleb128(zero_list[run]), _uleb128(end_list[run] - start_list[run]),
                      data[base + start_list[run]:base + end_list[run]])
        out.append(b"".join(parts))
    return out


def _varint_sizes(values: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """Bytes of each value as ULEB128 (values below 2**35)."""
    sizes = np.ones_like(values)
    for k in range(1, 5):
        sizes += values >= 1 << (7 * k)
    return sizes


def decode(delta: bytes | memoryview, page: bytearray | memoryview) -> None:
    """Apply ``delta`` to ``page`` (the receiver's copy of the last-sent version), in place."""
    data = memoryview(delta)
    target = memoryview(page)
    pos = offset = 0
    while pos < len(data):
        zrun, pos = _read_uleb128(data, pos)
        nzrun, pos = _read_uleb128(data, pos)
        offset += zrun
        if offset + nzrun > len(target) or pos + nzrun > len(data):
            raise InvalidRequest("XBZRLE delta runs past the page", details={"offset": offset})
        target[offset : offset + nzrun] = data[pos : pos + nzrun]
        offset += nzrun
        pos += nzrun


class PageCache:
    """LRU cache of the last-sent version of pages, bounded by the bytes it holds."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise InvalidRequest("cache capacity must not be negative")
        self.capacity_bytes = capacity_bytes
        self.size_bytes = 0
        self._pages: OrderedDict[int, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pages)

    def __contains__(self, index: object) -> bool:
        return index in self._pages

    def get(self, index: int) -> bytes | None:
        page = self._pages.get(index)
        if page is not None:
            self._pages.move_to_end(index)
        return page

    def put(self, index: int, page: bytes) -> None:
        self.discard(index)
        if len(page) > self.capacity_bytes:
            return
        self._pages[index] = page
        self.size_bytes += len(page)
        while self.size_bytes > self.capacity_bytes:
            _, evicted = self._pages.popitem(last=False)
            self.size_bytes -= len(evicted)

    def discard(self, index: int) -> None:
        old = self._pages.pop(index, None)
        if old is not None:
            self.size_bytes -= len(old)
