"""Delta sync without Ray: plan, encode, apply, verify, checkpoint and resume.

``serial_sync`` runs the steps one range at a time, as the Ray driver does per range; it hashes
every target range first, so that every block the target holds is found as a local copy.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from novacron.errors import InvalidRequest
from novacron.migration.blocks import Geometry, file_image_digest, hash_range
from novacron.migration.codecs import FrameKind, Location, frame_header, make_batch
from novacron.migration.delta import (
    IMAGE,
    BlockIndex,
    RangePlan,
    SyncCheckpoint,
    SyncReport,
    apply_batch,
    encode_range,
    plan_range,
)

BS = 4096
rng = np.random.default_rng(7)
PATTERNS = {
    "zero": bytes(BS),
    "a": rng.bytes(BS),
    "b": rng.bytes(BS),
    "text": (b"lorem ipsum dolor sit amet " * 200)[:BS],
}


class Stop(Exception):
    """Interrupts a sync after some ranges."""


def serial_sync(
    src: Path,
    dst: Path,
    geometry: Geometry,
    *,
    seeds: tuple[Path, ...] = (),
    checkpoint: SyncCheckpoint | None = None,
    stop_after: int | None = None,
) -> tuple[SyncCheckpoint, Counter[str]]:
    """Sync ``dst`` to ``src`` with the pure steps; returns the checkpoint and frame kinds."""
    state = checkpoint or SyncCheckpoint(geometry)
    kinds: Counter[str] = Counter()
    if not dst.exists():
        dst.write_bytes(b"")
    os.truncate(dst, geometry.image_size)
    index = BlockIndex()
    for k, seed in enumerate(seeds, start=1):
        seed_geo = Geometry(seed.stat().st_size, geometry.block_size, geometry.range_blocks)
        for r in range(seed_geo.n_ranges):
            index.add(k, hash_range(seed, seed_geo, r, strong=False))
    pending = state.pending()
    targets = {r: hash_range(dst, geometry, r) for r in pending}
    for r in pending:
        index.add(IMAGE, targets[r])
    for count, r in enumerate(pending):
        if stop_after is not None and count == stop_after:
            raise Stop(state.to_json())
        source = hash_range(src, geometry, r)
        plan = plan_range(source, targets[r], index)
        digest = targets[r].digest
        if not plan.empty:
            batch, stats = encode_range(src, geometry, plan, level=3)
            kinds.update(stats.kinds)
            result = apply_batch(dst, geometry, r, batch, targets[r].leaves, seeds)
            if result.misses:
                kinds["LOCAL_COPY"] -= len(result.misses)
                kinds["miss"] += len(result.misses)
                batch, stats = encode_range(src, geometry, RangePlan(r, send=result.misses), 3)
                kinds.update(stats.kinds)
                result = apply_batch(dst, geometry, r, batch, result.leaves, seeds)
            assert not result.misses
            digest = result.digest
        assert digest == source.digest
        state.mark_done(r, digest)
    return state, kinds


def write(path: Path, blocks: list[bytes], tail: bytes = b"") -> Path:
    path.write_bytes(b"".join(blocks) + tail)
    return path


def check_synced(src: Path, dst: Path, state: SyncCheckpoint) -> None:
    assert dst.read_bytes() == src.read_bytes()
    assert state.complete
    assert state.image_digest() == file_image_digest(src, state.geometry)


def test_changed_blocks_move_by_kind(tmp_path: Path) -> None:
    p = PATTERNS
    fresh = rng.bytes(BS)
    old = [p["a"], p["text"], p["b"], bytes(BS), p["a"], p["b"]]
    new = [p["a"], bytes(BS), p["text"], fresh, p["a"], p["b"]]
    src, dst = write(tmp_path / "src", new), write(tmp_path / "dst", old)
    geo = Geometry(6 * BS, BS, 3)
    state, kinds = serial_sync(src, dst, geo)
    check_synced(src, dst, state)
    # block 1 zeroed, block 2 copied from where the target held that text, block 3 sent raw.
    assert kinds == Counter({"ZERO": 1, "LOCAL_COPY": 1, "RAW": 1})


def test_plan_classifies_and_prefers_seeds(tmp_path: Path) -> None:
    p = PATTERNS
    seed = write(tmp_path / "seed", [p["text"], p["b"]])
    src = write(tmp_path / "src", [bytes(BS), p["b"], p["a"], p["text"]])
    dst = write(tmp_path / "dst", [p["a"], p["b"], p["text"], bytes(BS)])
    geo = Geometry(4 * BS, BS, 4)
    index = BlockIndex()
    index.add(1, hash_range(seed, Geometry(2 * BS, BS, 4), 0, strong=False))
    target = hash_range(dst, geo, 0)
    index.add(IMAGE, target)
    assert len(index) == 3
    plan = plan_range(hash_range(src, geo, 0), target, index)
    assert plan.zero == (0,)
    assert plan.copy == ((2, Location(IMAGE, 0)), (3, Location(1, 0)))
    assert plan.send == ()
    state, kinds = serial_sync(src, dst, geo, seeds=(seed,))
    check_synced(src, dst, state)
    assert kinds == Counter({"ZERO": 1, "LOCAL_COPY": 2})


def test_local_copy_overwritten_earlier_is_sent_instead(tmp_path: Path) -> None:
    p = PATTERNS
    # Block 1 wants what the target holds at block 0, but range 0 rewrites block 0 first.
    src = write(tmp_path / "src", [p["b"], p["a"]])
    dst = write(tmp_path / "dst", [p["a"], p["text"]])
    state, kinds = serial_sync(src, dst, Geometry(2 * BS, BS, 1))
    check_synced(src, dst, state)
    assert kinds["miss"] == 1
    assert kinds["LOCAL_COPY"] == 0


def test_target_of_another_size_is_resized(tmp_path: Path) -> None:
    src = write(tmp_path / "src", [PATTERNS["a"]] * 3, tail=b"end")
    geo = Geometry(src.stat().st_size, BS, 2)
    for old in ([PATTERNS["a"]], [PATTERNS["b"]] * 5):
        dst = write(tmp_path / "dst", old)
        state, _ = serial_sync(src, dst, geo)
        check_synced(src, dst, state)
    state, _ = serial_sync(src, tmp_path / "new", geo)
    check_synced(src, tmp_path / "new", state)


def test_apply_refuses_frames_outside_the_range_and_unknown_seeds(tmp_path: Path) -> None:
    dst = write(tmp_path / "dst", [bytes(BS)] * 2)
    geo = Geometry(2 * BS, BS, 1)
    leaves = hash_range(dst, geo, 0).leaves
    with pytest.raises(InvalidRequest):
        apply_batch(dst, geo, 0, make_batch([frame_header(1, FrameKind.ZERO, 0)]), leaves)
    plan = RangePlan(0, copy=((0, Location(3, 0)),), digests={0: bytes(16)})
    batch, _ = encode_range(dst, geo, plan, 1)
    with pytest.raises(InvalidRequest):
        apply_batch(dst, geo, 0, batch, leaves)
    with pytest.raises(InvalidRequest):
        apply_batch(dst, geo, 0, make_batch([]), b"short")


def test_interrupted_sync_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    blocks = [rng.bytes(BS) for _ in range(8)]
    src = write(tmp_path / "src", blocks)
    dst = write(tmp_path / "dst", [bytes(BS)] * 8)
    geo = Geometry(8 * BS, BS, 2)
    with pytest.raises(Stop) as stopped:
        serial_sync(src, dst, geo, stop_after=2)
    saved = SyncCheckpoint.from_json(str(stopped.value))
    assert sorted(saved.done) == [0, 1]
    assert saved.pending() == [2, 3]
    state, kinds = serial_sync(src, dst, geo, checkpoint=saved)
    check_synced(src, dst, state)
    assert kinds == Counter({"RAW": 4})  # only the two pending ranges moved


def test_checkpoint_json_and_invalidation() -> None:
    geo = Geometry(10 * BS, BS, 2)
    state = SyncCheckpoint(geo, {r: bytes([r]) * 32 for r in range(5)})
    assert SyncCheckpoint.from_json(state.to_json()) == state
    state.invalidate([(3 * BS, 2 * BS), (9 * BS + 5, 0)])  # blocks 3..4: ranges 1 and 2
    assert state.pending() == [1, 2]
    with pytest.raises(InvalidRequest):
        state.image_digest()


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        '{"version": 2}',
        '{"version": 1, "geometry": {"image_size": 4096}, "done": {}}',
        '{"version": 1, "geometry": {"image_size": 4096, "block_size": 4096, "range_blocks": 1},'
        ' "done": {"5": "00"}}',
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        SyncCheckpoint.from_json(text)


def test_report_is_verified_only_with_an_image_digest() -> None:
    report = SyncReport(Geometry(BS, BS, 1), zstd_level=1, bytes_sent=10, bytes_received=5)
    assert not report.verified
    assert report.bytes_moved == 15
    report.image_digest = "ab"
    assert report.to_dict()["verified"] is True


block = st.one_of(
    st.sampled_from(sorted(PATTERNS)).map(PATTERNS.__getitem__),
    st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed).bytes(BS)),
)
image = st.tuples(st.lists(block, min_size=0, max_size=10), st.binary(max_size=100))


@settings(max_examples=60, deadline=None)
@given(old=image, new=image, seed=st.one_of(st.none(), image), per_range=st.integers(1, 4))
def test_apply_of_diff_gives_the_new_image(
    old: tuple[list[bytes], bytes],
    new: tuple[list[bytes], bytes],
    seed: tuple[list[bytes], bytes] | None,
    per_range: int,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        src, dst = write(d / "src", *new), write(d / "dst", *old)
        seeds = (write(d / "seed", *seed),) if seed is not None else ()
        geo = Geometry(src.stat().st_size, BS, per_range)
        state, _ = serial_sync(src, dst, geo, seeds=seeds)
        check_synced(src, dst, state)
