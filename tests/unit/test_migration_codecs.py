"""Frames, the zstd level chooser, block and page codecs."""

from __future__ import annotations

import numpy as np
import pytest

from novacron.errors import InvalidRequest
from novacron.migration.codecs import (
    MAGIC,
    BlockDecoder,
    BlockEncoder,
    Frame,
    FrameKind,
    Location,
    PageDecoder,
    PageEncoder,
    choose_zstd_level,
    frame_header,
    iter_frames,
    local_copy_payload,
    make_batch,
    parse_local_copy,
)
from novacron.migration.xbzrle import PageCache

PAGE = 4096
TEXT = (b"the quick brown fox jumps over the lazy dog " * 100)[:PAGE]


def test_zstd_level_rises_as_the_link_slows() -> None:
    speeds = [10e9, 1e9, 100e6, 20e6, 1e6]
    levels = [choose_zstd_level(s) for s in speeds]
    assert levels == sorted(levels)
    assert levels[0] == 0
    assert levels[-1] > levels[1] >= 1
    assert choose_zstd_level(None) == 1
    with pytest.raises(InvalidRequest):
        choose_zstd_level(0)


def test_block_encoder_elides_zeros_compresses_text_and_keeps_random_raw() -> None:
    encoder, decoder = BlockEncoder(3), BlockDecoder()
    noise = np.random.default_rng(0).bytes(PAGE)
    batch = make_batch(
        [encoder.encode(0, bytes(PAGE)), encoder.encode(1, TEXT), encoder.encode(2, noise)]
    )
    frames = list(iter_frames(batch))
    assert [(f.index, f.kind) for f in frames] == [
        (0, FrameKind.ZERO),
        (1, FrameKind.ZSTD),
        (2, FrameKind.RAW),
    ]
    assert len(frames[1].payload) < PAGE // 4
    assert [decoder.decode(f, PAGE) for f in frames] == [bytes(PAGE), TEXT, noise]


def test_level_zero_sends_raw() -> None:
    frame = next(iter_frames(make_batch([BlockEncoder(0).encode(7, TEXT)])))
    assert (frame.index, frame.kind, bytes(frame.payload)) == (7, FrameKind.RAW, TEXT)


def test_decoder_refuses_wrong_length_and_non_self_contained_frames() -> None:
    decoder = BlockDecoder()
    with pytest.raises(InvalidRequest):
        decoder.decode(Frame(0, FrameKind.RAW, b"abc"), 4)
    with pytest.raises(InvalidRequest):
        decoder.decode(Frame(0, FrameKind.XBZRLE, b""), 4)


@pytest.mark.parametrize(
    "batch",
    [
        b"XXXX",
        MAGIC + frame_header(0, FrameKind.RAW, 10) + b"short",
        MAGIC + b"\x00\x01",
        MAGIC + bytes([0] * 8 + [99, 0, 0, 0, 0]),
    ],
)
def test_malformed_batches_are_refused(batch: bytes) -> None:
    with pytest.raises(InvalidRequest):
        list(iter_frames(batch))


def test_local_copy_payload_round_trips() -> None:
    where, digest = Location(2, 12345), bytes(range(16))
    assert parse_local_copy(local_copy_payload(where, digest)) == (where, digest)


def test_page_stream_sends_deltas_for_pages_sent_again() -> None:
    rng = np.random.default_rng(3)
    memory = bytearray(rng.integers(0, 256, 8 * PAGE, dtype=np.uint8).tobytes())
    memory[PAGE : 2 * PAGE] = bytes(PAGE)
    received = bytearray(len(memory))
    encoder = PageEncoder(3, PageCache(4 * PAGE))
    decoder = PageDecoder(received, PAGE)

    def send(pages: list[int], resend: bool) -> list[FrameKind]:
        batch = encoder.encode_pages(memory, pages, resend=resend)
        assert decoder.apply_batch(batch) == len(pages)
        return [f.kind for f in iter_frames(batch)]

    kinds = send(list(range(8)), resend=False)
    assert kinds[1] is FrameKind.ZERO
    assert encoder.zero_pages == 1
    assert FrameKind.XBZRLE not in kinds
    assert received == memory
    # The guest dirties a few bytes of some pages: the first resend fills the cache, the next
    # ones travel as deltas.
    for step in range(3):
        for page in (0, 2, 3):
            memory[page * PAGE + 100 + step] ^= 0xFF
        kinds = send([0, 2, 3], resend=True)
        assert received == memory
    assert set(kinds) <= {FrameKind.XBZRLE, FrameKind.XBZRLE_ZSTD}
    # A page rewritten completely goes whole; a page zeroed goes as a zero frame.
    memory[0:PAGE] = rng.bytes(PAGE)
    memory[2 * PAGE : 3 * PAGE] = bytes(PAGE)
    assert send([0, 2], resend=True) == [FrameKind.RAW, FrameKind.ZERO]
    assert received == memory
    assert 2 not in encoder.cache


def test_a_batch_of_pages_encodes_as_page_by_page() -> None:
    rng = np.random.default_rng(5)
    memory = bytearray(rng.integers(0, 256, 16 * PAGE, dtype=np.uint8).tobytes())
    memory[: 4 * PAGE] = TEXT * 4
    memory[4 * PAGE : 6 * PAGE] = bytes(2 * PAGE)
    batched, single = (PageEncoder(1, PageCache(6 * PAGE)) for _ in range(2))  # evicts
    for step in range(4):
        pages = [p for p in range(16) if (p + step) % 3]
        for p in pages[::2]:
            memory[p * PAGE + 64 * step : p * PAGE + 64 * step + 8] = rng.bytes(8)
        resend = step > 0
        expected = make_batch(
            single.encode(p, bytes(memory[p * PAGE : (p + 1) * PAGE]), resend=resend)
            for p in pages)
        assert batched.encode_pages(memory, pages, resend=resend) == expected
        assert [p in batched.cache for p in range(16)] == [p in single.cache for p in range(16)]


def test_page_decoder_refuses_pages_outside_memory() -> None:
    decoder = PageDecoder(bytearray(PAGE), PAGE)
    with pytest.raises(InvalidRequest):
        decoder.apply(Frame(1, FrameKind.ZERO, b""))
