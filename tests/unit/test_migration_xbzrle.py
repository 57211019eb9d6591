"""XBZRLE page deltas and the bounded cache of last-sent pages."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.errors import InvalidRequest
from novacron.migration import xbzrle
from novacron.migration.xbzrle import PageCache


def test_delta_is_qemu_style_runs_of_new_bytes() -> None:
    old = bytes(16)
    new = bytearray(old)
    new[2:4] = b"ab"
    new[10] = 0x7F
    # zero run 2, 2 new bytes "ab", zero run 6, 1 new byte; the trailing zero run is left out.
    assert xbzrle.encode(old, bytes(new)) == b"\x02\x02ab\x06\x01\x7f"
    assert xbzrle.encode(old, old) == b""


def test_delta_lengths_use_uleb128() -> None:
    old, new = bytes(400), bytearray(400)
    new[300] = 1
    assert xbzrle.encode(old, bytes(new)) == b"\xac\x02\x01\x01"


def test_delta_not_smaller_than_the_page_is_refused() -> None:
    old = bytes(64)
    assert xbzrle.encode(old, bytes([1, 0] * 32)) is None
    assert xbzrle.encode(old, b"\x01" * 64) is None
    with pytest.raises(InvalidRequest):
        xbzrle.encode(old, bytes(63))


@pytest.mark.parametrize("delta", [b"\x02", b"\x80", b"\x00\x05ab", b"\x10\x01x"])
def test_malformed_deltas_are_refused(delta: bytes) -> None:
    with pytest.raises(InvalidRequest):
        xbzrle.decode(delta, bytearray(16))


@settings(max_examples=200, deadline=None)
@given(
    old=st.binary(min_size=1, max_size=4096),
    edits=st.lists(
        st.tuples(st.integers(0, 4095), st.binary(min_size=1, max_size=64)), max_size=12
    ),
)
def test_delta_round_trips(old: bytes, edits: list[tuple[int, bytes]]) -> None:
    new = bytearray(old)
    for pos, data in edits:
        start = pos % len(new)
        new[start : start + len(data)] = data[: len(new) - start]
    delta = xbzrle.encode(old, bytes(new))
    if delta is None:
        return
    assert len(delta) < len(new)
    page = bytearray(old)
    xbzrle.decode(delta, page)
    assert page == new


@settings(max_examples=100, deadline=None)
@given(
    pages=st.lists(
        st.tuples(
            st.binary(min_size=64, max_size=64),
            st.lists(st.tuples(st.integers(0, 63), st.binary(min_size=1, max_size=40)),
                     max_size=6),
        ),
        min_size=1, max_size=8,
    ),
)
def test_a_batch_encodes_each_page_as_alone(
        pages: list[tuple[bytes, list[tuple[int, bytes]]]]) -> None:
    olds, news = [], []
    for old, edits in pages:
        new = bytearray(old)
        for pos, data in edits:
            new[pos : pos + len(data)] = data[: 64 - pos]
        olds.append(old)
        news.append(bytes(new))
    as_array = [np.frombuffer(b"".join(p), dtype=np.uint8).reshape(-1, 64) for p in (olds, news)]
    assert xbzrle.encode_batch(*as_array) == [
        xbzrle.encode(o, n) for o, n in zip(olds, news, strict=True)]


def test_a_batch_needs_two_arrays_of_one_shape() -> None:
    with pytest.raises(InvalidRequest):
        xbzrle.encode_batch(np.zeros((2, 64), np.uint8), np.zeros((3, 64), np.uint8))


def test_cache_evicts_least_recently_used_by_bytes() -> None:
    cache = PageCache(capacity_bytes=30)
    for i in range(3):
        cache.put(i, bytes([i]) * 10)
    assert cache.get(0) == bytes(10)  # 0 is now the most recently used
    cache.put(3, b"\x03" * 10)
    assert 1 not in cache
    assert {0, 2, 3} == {i for i in range(4) if i in cache}
    assert cache.size_bytes == 30
    cache.put(2, b"\x02" * 5)
    assert cache.size_bytes == 25
    cache.put(9, bytes(31))
    assert 9 not in cache
    cache.discard(0)
    assert (len(cache), cache.size_bytes) == (2, 15)
    with pytest.raises(InvalidRequest):
        PageCache(-1)
