"""Delta sync through Ray tasks: an interrupted and resumed sync, a template seed, a cap."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actors.sync_tasks import sync_file
from novacron.migration.blocks import Geometry, file_image_digest
from novacron.migration.codecs import choose_zstd_level
from novacron.migration.delta import SyncCheckpoint

BS = 64 * 1024


class Interrupted(Exception):
    pass


def test_sync_file_through_ray(ray_session: None, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    text = (b"a disk block full of compressible text " * 2000)[:BS]
    old = bytearray(rng.bytes(5 * 1024 * 1024 + 1000))
    old[BS : 9 * BS] = bytes(8 * BS)
    new = bytearray(old)
    new[2 * BS : 3 * BS] = text  # zero -> text
    new[20 * BS : 21 * BS] = bytes(BS)  # data -> zero
    new[50 * BS : 51 * BS] = rng.bytes(BS)  # fresh random data
    new[-10:] = b"0123456789"
    src, dst, template = tmp_path / "src", tmp_path / "dst", tmp_path / "template"
    src.write_bytes(bytes(new))
    dst.write_bytes(bytes(old[: 3 * 1024 * 1024]))  # an older, shorter copy
    template.write_bytes(bytes(old))
    geometry = Geometry(len(new), BS, 16)

    saved: list[str] = []

    def interrupt(state: SyncCheckpoint) -> None:
        saved.append(state.to_json())
        raise Interrupted

    with pytest.raises(Interrupted):
        sync_file(src, dst, checkpoint=SyncCheckpoint(geometry), on_checkpoint=interrupt)
    resumed = SyncCheckpoint.from_json(saved[-1])
    assert 0 < len(resumed.done) < geometry.n_ranges

    report = sync_file(src, dst, checkpoint=resumed, bandwidth_cap=20e6)
    assert dst.read_bytes() == bytes(new)
    assert report.verified
    assert report.image_digest == file_image_digest(src, geometry).hex()
    assert report.ranges_resumed == len(resumed.done)
    assert report.zstd_level == choose_zstd_level(20e6)
    assert report.duration_s >= (report.bytes_sent - 2e6) / 20e6

    # A new copy on a host that holds the template: only what differs from it travels.
    fresh = tmp_path / "fresh"
    report = sync_file(src, fresh, seeds=[template])
    assert fresh.read_bytes() == bytes(new)
    assert report.verified
    # 8 zero blocks are already there (a new image reads as zeros); 3 blocks are not in the
    # template (text, fresh random data, the tail); the rest is copied from the template.
    assert report.blocks_unchanged == 8
    assert report.blocks["LOCAL_COPY"] == geometry.n_blocks - 8 - 3
    assert report.bytes_sent < 3 * BS

    again = sync_file(src, fresh)
    assert again.verified
    assert again.bytes_sent == 0
    assert again.blocks_unchanged == geometry.n_blocks
