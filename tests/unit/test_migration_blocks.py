"""Block geometry, block digests and the BLAKE3 image digest."""

from __future__ import annotations

from pathlib import Path

import blake3
import numpy as np
import pytest
import xxhash

from novacron.errors import InvalidRequest
from novacron.migration.blocks import (
    Geometry,
    GiB,
    KiB,
    MiB,
    choose_block_size,
    file_image_digest,
    hash_range,
    image_digest,
    is_zero,
)


@pytest.mark.parametrize(
    ("size", "block"),
    [(0, 64 * KiB), (1, 64 * KiB), (4 * GiB, 64 * KiB), (16 * GiB, 128 * KiB), (1 << 40, 4 * MiB)],
)
def test_block_size_grows_with_the_image_within_bounds(size: int, block: int) -> None:
    assert choose_block_size(size) == block


def test_geometry_cuts_blocks_and_ranges() -> None:
    geo = Geometry(image_size=10 * 4096 + 100, block_size=4096, range_blocks=4)
    assert geo.n_blocks == 11
    assert geo.n_ranges == 3
    assert list(geo.range_blocks_of(2)) == [8, 9, 10]
    assert geo.block_extent(10) == (40960, 100)
    assert geo.range_extent(2) == (8 * 4096, 2 * 4096 + 100)
    assert Geometry.from_dict(geo.to_dict()) == geo
    assert Geometry.for_size(4 * GiB).range_size == 128 * MiB
    assert Geometry.for_size(GiB).n_ranges == 16
    assert Geometry.for_size(MiB).range_size == 8 * MiB


@pytest.mark.parametrize(
    ("size", "block", "per_range"), [(-1, 4096, 1), (10, 1000, 1), (10, 4096, 0)]
)
def test_invalid_geometry_is_refused(size: int, block: int, per_range: int) -> None:
    with pytest.raises(InvalidRequest):
        Geometry(size, block, per_range)


def test_is_zero_handles_any_length() -> None:
    assert is_zero(bytes(13))
    assert not is_zero(bytes(12) + b"\x01")
    assert not is_zero(b"\x01" + bytes(16))
    assert is_zero(b"")


def _image(tmp_path: Path, blocks: list[bytes], tail: bytes = b"") -> Path:
    path = tmp_path / "img"
    path.write_bytes(b"".join(blocks) + tail)
    return path


def test_hash_range_gives_xxh3_digests_zero_map_and_leaves(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    blocks = [rng.bytes(4096), bytes(4096), rng.bytes(4096)]
    path = _image(tmp_path, blocks, tail=b"tail")
    geo = Geometry(path.stat().st_size, 4096, 2)
    first, second = hash_range(path, geo, 0), hash_range(path, geo, 1)
    assert first.digests == b"".join(xxhash.xxh3_128_digest(b) for b in blocks[:2])
    assert first.zero_mask().tolist() == [False, True]
    assert first.leaves == b"".join(blake3.blake3(b).digest() for b in blocks[:2])
    assert first.digest == blake3.blake3(first.leaves).digest()
    assert second.first_block == 2
    assert second.n_blocks == 2
    assert second.digest_of(3) == xxhash.xxh3_128_digest(b"tail")
    weak = hash_range(path, geo, 0, strong=False)
    assert (weak.digests, weak.leaves, weak.digest) == (first.digests, b"", b"")


def test_image_digest_covers_every_byte(tmp_path: Path) -> None:
    data = bytearray(np.random.default_rng(2).bytes(5 * 4096 + 7))
    path = tmp_path / "img"
    path.write_bytes(bytes(data))
    geo = Geometry(len(data), 4096, 2)
    digest = file_image_digest(path, geo)
    assert digest == file_image_digest(path, geo)
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert file_image_digest(path, geo) != digest


def test_image_digest_needs_every_range_and_a_full_image(tmp_path: Path) -> None:
    geo = Geometry(3 * 4096, 4096, 1)
    with pytest.raises(InvalidRequest):
        image_digest(geo, [b"x" * 32])
    path = _image(tmp_path, [bytes(4096)])
    with pytest.raises(InvalidRequest):
        hash_range(path, geo, 0)
    with pytest.raises(InvalidRequest):
        hash_range(path, Geometry(4096, 4096, 1), 1)
