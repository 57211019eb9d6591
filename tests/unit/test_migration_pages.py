"""Page batches between two memory files: raw and codec batches, zero elision, XBZRLE on pages
sent again, the bandwidth cap on wire bytes, a cancel mid-pass, bad batches."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from novacron.errors import InvalidRequest
from novacron.migration.pages import (
    BATCH_PAGES,
    PAGE_SIZE,
    FramePages,
    PageBatch,
    PageReader,
    PageWriter,
    RawPages,
    memory_digest,
    send_pages,
)
from novacron.migration.throttle import TokenBucket

TEXT = (b"svc=sim-042;state=ok;ttl=300;owner=tenant-3;" * 100)[:PAGE_SIZE]


def memory(tmp_path: Path, pages: int, rng: np.random.Generator) -> tuple[Path, Path]:
    """A source of text, random and zero pages (every third kind), and an empty target."""
    data = np.zeros((pages, PAGE_SIZE), dtype=np.uint8)
    data[0::3] = np.frombuffer(TEXT, dtype=np.uint8)
    data[1::3] = rng.integers(0, 256, (len(data[1::3]), PAGE_SIZE), dtype=np.uint8)
    src, dst = tmp_path / "src.mem", tmp_path / "dst.mem"
    src.write_bytes(data.tobytes())
    dst.write_bytes(bytes(pages * PAGE_SIZE))
    return src, dst


def write(path: Path, page: int, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(page * PAGE_SIZE + offset)
        f.write(data)


def page_of(path: Path, page: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(page * PAGE_SIZE)
        return f.read(PAGE_SIZE)


@pytest.mark.parametrize(("compress", "xbzrle"), [(False, False), (True, False),
                                                  (False, True), (True, True)])
def test_a_pass_copies_exactly_the_given_pages(tmp_path: Path, compress: bool,
                                               xbzrle: bool) -> None:
    src, dst = memory(tmp_path, 96, np.random.default_rng(1))
    dst.write_bytes(b"\xff" * 96 * PAGE_SIZE)  # the target's old content shows what was written
    pages = np.array([0, 1, 2, 5, 50, 95])
    sent: list[int] = []
    with PageReader(src, compress=compress, xbzrle=xbzrle) as reader, PageWriter(dst) as writer:
        result = send_pages(reader, pages, writer.apply, resend=False, on_batch=sent.append)
    assert (result.pages, result.bytes, result.zero_pages) == (6, 6 * PAGE_SIZE, 4)
    assert result.wire_bytes == sum(sent)
    for p in range(96):
        assert (page_of(dst, p) == page_of(src, p)) == (p in pages)


def test_raw_batches_send_zero_pages_as_indices(tmp_path: Path) -> None:
    src, dst = memory(tmp_path, 3 * BATCH_PAGES + 30, np.random.default_rng(2))
    pages = np.arange(3 * BATCH_PAGES + 30)
    batches: list[PageBatch] = []
    with PageReader(src) as reader, PageWriter(dst) as writer:

        def sink(batch: PageBatch) -> None:
            batches.append(pickle.loads(pickle.dumps(batch, protocol=5)))  # as Ray ships it
            writer.apply(batches[-1])

        result = send_pages(reader, pages, sink, resend=False)
    assert [b.pages for b in batches] == [BATCH_PAGES] * 3 + [30]
    assert all(isinstance(b, RawPages) for b in batches)
    zero = len(pages) // 3
    assert result.zero_pages == zero
    assert result.wire_bytes == 8 * len(pages) + (len(pages) - zero) * PAGE_SIZE
    assert memory_digest(src) == memory_digest(dst)


def test_without_zero_elision_raw_batches_carry_every_page(tmp_path: Path) -> None:
    src, dst = memory(tmp_path, 30, np.random.default_rng(8))
    dst.write_bytes(b"\xff" * 30 * PAGE_SIZE)
    with PageReader(src, elide_zero=False) as reader, PageWriter(dst) as writer:
        result = send_pages(reader, np.arange(30), writer.apply, resend=False)
    assert (result.zero_pages, result.wire_bytes) == (0, 30 * (8 + PAGE_SIZE))
    assert memory_digest(src) == memory_digest(dst)


def test_compression_shrinks_text_and_leaves_random_pages_whole(tmp_path: Path) -> None:
    src, dst = memory(tmp_path, 300, np.random.default_rng(3))
    pages = np.arange(300)
    with PageReader(src, compress=True, level=3) as reader, PageWriter(dst) as writer:
        result = send_pages(reader, pages, writer.apply, resend=False)
    random_bytes = 100 * PAGE_SIZE
    assert random_bytes < result.wire_bytes < random_bytes * 1.05  # text ~free, zero pages free
    assert memory_digest(src) == memory_digest(dst)


def test_xbzrle_sends_small_deltas_for_pages_sent_again(tmp_path: Path) -> None:
    src, dst = memory(tmp_path, 64, np.random.default_rng(4))
    hot = np.array([p for p in range(0, 64, 2) if p % 3 != 2])  # text and random pages
    with PageReader(src, xbzrle=True) as reader, PageWriter(dst) as writer:
        first = send_pages(reader, np.arange(64), writer.apply, resend=False)
        second = send_pages(reader, hot, writer.apply, resend=True)  # full pages, now cached
        for p in hot.tolist():
            write(src, p, 64 * (p % 64), p.to_bytes(8, "little") * 2)  # one cache line changes
        third = send_pages(reader, hot, writer.apply, resend=True)
        assert memory_digest(src) == memory_digest(dst)
        assert third.wire_bytes < len(hot) * 40  # a delta of ~16 bytes and a header per page
        assert third.wire_bytes < second.wire_bytes / 50
        # a cached page that became zero, then non-zero again: no delta against a stale copy
        write(src, 0, 0, bytes(PAGE_SIZE))
        send_pages(reader, np.array([0]), writer.apply, resend=True)
        write(src, 0, 128, b"back")
        send_pages(reader, np.array([0]), writer.apply, resend=True)
    assert first.pages == 64
    assert memory_digest(src) == memory_digest(dst)


def test_without_xbzrle_pages_sent_again_go_whole(tmp_path: Path) -> None:
    src, dst = memory(tmp_path, 8, np.random.default_rng(5))
    pages = np.array([1, 4, 7])  # random pages
    with PageReader(src, compress=True) as reader, PageWriter(dst) as writer:
        send_pages(reader, pages, writer.apply, resend=True)
        for p in pages.tolist():
            write(src, p, 0, b"x")
        again = send_pages(reader, pages, writer.apply, resend=True)
    assert again.wire_bytes > 3 * PAGE_SIZE
    assert all(page_of(src, p) == page_of(dst, p) for p in pages.tolist())


def test_the_cap_paces_the_wire_bytes(tmp_path: Path) -> None:
    src, dst = memory(tmp_path, 2 * BATCH_PAGES, np.random.default_rng(6))
    bucket = TokenBucket(32e6, burst=1e6)
    with PageReader(src) as reader, PageWriter(dst) as writer:
        result = send_pages(reader, np.arange(2 * BATCH_PAGES), writer.apply, resend=False,
                            bucket=bucket)
    assert result.wire_bytes > 10e6  # two thirds of 16 MiB: zero pages cost no tokens
    assert result.seconds >= (result.wire_bytes - 1e6) / 32e6
    assert memory_digest(src) == memory_digest(dst)


def test_a_raising_callback_stops_the_pass_cleanly(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.mem", tmp_path / "dst.mem"
    src.write_bytes(b"\1" * 4096 * PAGE_SIZE)
    dst.write_bytes(bytes(4096 * PAGE_SIZE))

    def cancel(_: int) -> None:
        raise KeyboardInterrupt

    # not a BufferError from the mappings as the pass unwinds
    with pytest.raises(KeyboardInterrupt), PageReader(src) as reader, \
            PageWriter(dst) as writer:
        send_pages(reader, np.arange(4096), writer.apply, resend=False, on_batch=cancel)
    assert page_of(dst, 0) == b"\1" * PAGE_SIZE
    assert page_of(dst, BATCH_PAGES) == bytes(PAGE_SIZE)


def test_bad_batches_are_refused(tmp_path: Path) -> None:
    dst = tmp_path / "dst.mem"
    dst.write_bytes(bytes(4 * PAGE_SIZE))
    page = np.zeros((1, PAGE_SIZE), dtype=np.uint8)
    empty = np.empty(0, dtype=np.int64)
    with PageWriter(dst) as writer:
        with pytest.raises(InvalidRequest, match="out of range"):
            writer.apply(RawPages(empty, np.array([4]), page))
        with pytest.raises(InvalidRequest, match="out of range"):
            writer.apply(RawPages(np.array([-1]), empty, page[:0]))
        with PageReader(dst, compress=True) as reader:
            frames = reader.encode(np.array([0, 1]), resend=False)
        assert isinstance(frames, FramePages)
        with pytest.raises(InvalidRequest, match="fewer pages"):
            writer.apply(FramePages(frames.frames, 3, 2))


def test_an_empty_pass_moves_nothing(tmp_path: Path) -> None:
    src, dst = memory(tmp_path, 4, np.random.default_rng(7))
    with PageReader(src) as reader, PageWriter(dst) as writer:
        result = send_pages(reader, np.empty(0, dtype=np.intp), writer.apply, resend=True)
    assert (result.pages, result.wire_bytes, result.rate) == (0, 0, 0.0)
    assert page_of(dst, 0) == bytes(PAGE_SIZE)
