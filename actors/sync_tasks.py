"""Delta sync as Ray tasks, and ``sync_file``, the driver that runs one sync through them.

The tasks wrap the steps of ``novacron.migration.delta``. Hashing, the heavy part, runs on both
hosts in parallel, one range per task, ``parallelism`` streams per host. Each range is planned by
the driver as soon as both sides' digests are in, then encoded on the source and applied on the
target between the hashing tasks, its frames travelling through the Ray object store, paced by
the bandwidth cap. Written ranges become durable with a flush of the target every
``FLUSH_INTERVAL_S``, and only then enter the checkpoint handed to ``on_checkpoint``.

Tasks run on their host's Ray node, placed by ``actors.options.placement``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import ray
from ray import ObjectRef

from actors.options import placement
from novacron.errors import InvalidRequest
from novacron.migration.blocks import Geometry, RangeHashes, hash_range
from novacron.migration.codecs import choose_zstd_level
from novacron.migration.delta import (
    IMAGE,
    ApplyResult,
    BlockIndex,
    EncodeStats,
    RangePlan,
    SyncCheckpoint,
    SyncReport,
    apply_batch,
    encode_range,
    plan_range,
)
from novacron.migration.throttle import TokenBucket

log = logging.getLogger("novacron.migration")

FLUSH_INTERVAL_S = 0.25  # how often written ranges are made durable and checkpointed
ENCODE_BATCH_BYTES = 8 * 1024 * 1024  # changed data gathered per encode/apply task
MAX_RANGES_PER_TASK = 4  # ranges hashed by one task while many remain


# Every task takes a whole CPU: a host then never needs more Ray workers than it has CPUs, so no
# worker process has to start (and import numpy and friends) in the middle of a sync.


@ray.remote(num_cpus=1)
def stat_image(path: str) -> int:
    """Size of an image (0 when missing)."""
    return os.path.getsize(path) if os.path.exists(path) else 0


@ray.remote(num_cpus=1)
def prepare_target(path: str, size: int) -> None:
    """Create the target image if missing and give it the source's size."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


@ray.remote(num_cpus=1)
def hash_task(
    path: str, geometry: Geometry, ranges: list[int], strong: bool, keep_leaves: bool
) -> tuple[RangeHashes | bytes, ...]:
    """Digests of some ranges, then apart from them (one object each, called with
    ``num_returns=2 * len(ranges)``) their BLAKE3 leaves when ``keep_leaves``: the target keeps
    them, on its own node, for the apply. One task kind for every side, so that Ray reuses its
    workers from one task to the next."""
    hashes = [hash_range(path, geometry, r, strong=strong) for r in ranges]
    digests = [replace(h, leaves=b"") for h in hashes]
    return (*digests, *(h.leaves if keep_leaves else b"" for h in hashes))


@ray.remote(num_cpus=1, num_returns=2)
def encode_task(
    path: str, geometry: Geometry, plans: list[RangePlan], level: int
) -> tuple[list[bytes], EncodeStats]:
    """The frame batches of some range plans, read and compressed on the source."""
    batches: list[bytes] = []
    size = bytes_read = 0
    kinds: Counter[str] = Counter()
    for plan in plans:
        batch, stats = encode_range(path, geometry, plan, level)
        batches.append(batch)
        size += stats.size
        bytes_read += stats.bytes_read
        kinds.update(stats.kinds)
    return batches, EncodeStats(size, dict(kinds), bytes_read)


@ray.remote(num_cpus=1)
def apply_task(
    path: str,
    geometry: Geometry,
    ranges: list[int],
    batches: list[bytes],
    seeds: Sequence[str],
    *leaves: bytes,
) -> list[ApplyResult]:
    """Apply batches to their ranges of the target (``leaves``: each range's, in order); leaves
    come back only for a range whose local copies missed, as a second batch must follow."""
    results = []
    for r, batch, range_leaves in zip(ranges, batches, leaves, strict=True):
        result = apply_batch(path, geometry, r, batch, range_leaves, seeds)
        results.append(result if result.misses else replace(result, leaves=b""))
    return results


@ray.remote(num_cpus=1)
def flush_target(path: str) -> None:
    """Make the writes to the target image durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _pin(host: str | None, host_nodes: Mapping[str, str]) -> dict[str, Any]:
    return placement(host, host_nodes.get(host)) if host is not None else {}


@dataclass
class _Pending:
    """A task in flight: its kind, its ranges and what else its completion needs."""

    kind: str  # src, dst, seed (hashing); encode, apply, flush
    ranges: list[int]
    context: Any = None


_HASHING = ("src", "dst", "seed")
_ON_SOURCE = ("src", "encode")
_ON_TARGET = ("dst", "seed", "apply", "flush")


class _SyncRun:
    """State of one ``sync_file`` call; every Ray call of the sync sits in this class.

    Seeds are hashed first; each range is planned once both sides' digests are in, local copies
    being looked up in the seeds and in the target ranges hashed so far.
    """

    def __init__(
        self,
        src: str,
        dst: str,
        state: SyncCheckpoint,
        *,
        parallelism: int,
        level: int,
        seeds: Sequence[str],
        seed_geometries: Sequence[Geometry],
        bucket: TokenBucket | None,
        pins: tuple[dict[str, Any], dict[str, Any]],
        one_host: bool,
        on_checkpoint: Callable[[SyncCheckpoint], None] | None,
        durable: bool,
    ) -> None:
        self.src, self.dst, self.geometry = src, dst, state.geometry
        self.checkpoint = state
        # Tasks in flight per host: as many queued as running, so that a worker never waits for
        # the driver, yet the driver (not Ray's queue) mostly picks what runs next.
        self.depth = 2 * parallelism
        self.level = level
        self.seeds = list(seeds)
        self.bucket = bucket
        src_pin, dst_pin = pins
        self.pins = {"src": src_pin, "dst": dst_pin}
        self.encode = encode_task.options(**src_pin)
        self.apply = apply_task.options(**dst_pin)
        self.flush = flush_target.options(**dst_pin)
        self.one_host = one_host
        self.on_checkpoint = on_checkpoint
        self.durable = durable
        self.report = SyncReport(state.geometry, level, ranges=state.geometry.n_ranges)
        self.kinds: Counter[str] = Counter()
        self.pending: dict[ObjectRef[Any], _Pending] = {}
        self.in_flight: Counter[str] = Counter()
        self.todo: dict[str, deque[Any]] = {kind: deque() for kind in _HASHING}
        pending_ranges = state.pending()
        self.report.ranges_resumed = state.geometry.n_ranges - len(pending_ranges)
        for k, geo in enumerate(seed_geometries, start=1):
            self.todo["seed"].extend((k, geo, r) for r in range(geo.n_ranges))
        self.todo["dst"].extend(pending_ranges)
        self.todo["src"].extend(pending_ranges)
        self.src_hashes: dict[int, RangeHashes] = {}
        self.dst_hashes: dict[int, RangeHashes] = {}
        self.src_digests: dict[int, bytes] = {}
        self.dst_leaves: dict[int, ObjectRef[Any] | bytes] = {}
        self.index = BlockIndex()
        self.encode_queue: deque[RangePlan] = deque()
        self.queued_send_bytes = 0
        self.apply_queue: deque[tuple[list[int], ObjectRef[Any], EncodeStats]] = deque()
        self.unflushed: list[tuple[int, bytes]] = []
        self.last_flush = time.monotonic()

    def run(self) -> SyncReport:
        try:
            self._submit()
            while self.pending:
                [ref], _ = ray.wait(list(self.pending), num_returns=1, fetch_local=False)
                task = self.pending.pop(ref)
                self.in_flight[task.kind] -= 1
                self._done(ref, task)
                self._submit()
        except BaseException:
            for ref in self.pending:
                ray.cancel(ref)
            raise
        self.report.blocks = {kind: n for kind, n in self.kinds.items() if n}
        if self.checkpoint.complete:
            self.report.image_digest = self.checkpoint.image_digest().hex()
        return self.report

    @property
    def seeds_hashed(self) -> bool:
        return not (self.todo["seed"] or self.in_flight["seed"])

    def _track(self, ref: ObjectRef[Any], task: _Pending) -> None:
        self.pending[ref] = task
        self.in_flight[task.kind] += 1

    def _room(self, kind: str) -> bool:
        """Whether the host that runs ``kind`` can take one more task."""
        kinds: tuple[str, ...] = _ON_SOURCE if kind in _ON_SOURCE else _ON_TARGET
        if self.one_host:
            kinds = _ON_SOURCE + _ON_TARGET
        return sum(self.in_flight[k] for k in kinds) < self.depth

    def _hash(
        self, kind: str, path: str, geometry: Geometry, ranges: list[int], seed: int = 0
    ) -> None:
        pin = self.pins["src" if kind == "src" else "dst"]
        task = hash_task.options(**pin, num_returns=2 * len(ranges))
        refs = task.remote(path, geometry, ranges, kind != "seed", kind == "dst")
        objects = cast("list[ObjectRef[Any]]", refs)
        digests, leaves = objects[: len(ranges)], objects[len(ranges) :]
        self._track(digests[0], _Pending(kind, ranges, (digests, seed, geometry)))
        if kind == "dst":
            self.dst_leaves.update(zip(ranges, leaves, strict=True))

    def _take(self, kind: str) -> list[Any]:
        """The next ranges of ``kind`` to hash in one task: several while many remain (fewer
        tasks), one by one towards the end (a short tail)."""
        todo = self.todo[kind]
        count = max(1, min(MAX_RANGES_PER_TASK, len(todo) // self.depth))
        taken = [todo.popleft()]
        while todo and len(taken) < count and (kind != "seed" or todo[0][0] == taken[0][0]):
            taken.append(todo.popleft())
        return taken

    def _submit(self) -> None:
        """Start what can start, finishing ranges first: applies, encodes, a flush when due,
        then hashing of the seeds and of the side that is behind."""
        while self.apply_queue and self._room("apply"):
            ranges, batches, encoded = self.apply_queue.popleft()
            if self.bucket is not None:
                self.bucket.acquire(encoded.size)
            leaves = [self.dst_leaves[r] for r in ranges]
            applied = self.apply.remote(
                self.dst, self.geometry, ranges, batches, self.seeds, *leaves
            )
            self._track(applied, _Pending("apply", ranges))
        while self.encode_queue and self._room("encode") and self._encode_due():
            plans = [self.encode_queue.popleft()]
            budget = self._send_bytes(plans[0])
            while self.encode_queue and budget + self._send_bytes(self.encode_queue[0]) <= (
                ENCODE_BATCH_BYTES
            ):
                budget += self._send_bytes(self.encode_queue[0])
                plans.append(self.encode_queue.popleft())
            self.queued_send_bytes -= budget
            refs = self.encode.remote(self.src, self.geometry, plans, self.level)
            batches, stats = cast("list[ObjectRef[Any]]", refs)
            ranges = [plan.range_index for plan in plans]
            self._track(stats, _Pending("encode", ranges, batches))
        self._maybe_flush()
        while self.todo["seed"] and self._room("seed"):
            taken = self._take("seed")
            k, geo = taken[0][0], taken[0][1]
            self._hash("seed", self.seeds[k - 1], geo, [r for _, _, r in taken], k)
        while True:
            sides = [s for s in ("dst", "src") if self.todo[s] and self._room(s)]
            if not sides:
                return
            side = max(sides, key=lambda s: len(self.todo[s]))
            path = self.dst if side == "dst" else self.src
            self._hash(side, path, self.geometry, self._take(side))

    def _send_bytes(self, plan: RangePlan) -> int:
        return len(plan.send) * self.geometry.block_size

    def _encode_due(self) -> bool:
        """Plans are encoded in batches of about ENCODE_BATCH_BYTES (fewer, larger tasks), and
        as they come once the last ranges are being hashed."""
        hashing_left = self.todo["src"] or self.todo["dst"] or self.todo["seed"]
        return self.queued_send_bytes >= ENCODE_BATCH_BYTES or not hashing_left

    def _queue_plan(self, plan: RangePlan) -> None:
        self.encode_queue.append(plan)
        self.queued_send_bytes += self._send_bytes(plan)

    def _maybe_flush(self) -> None:
        """Flush the target every FLUSH_INTERVAL_S, and at the end, when written ranges wait."""
        if not self.unflushed or self.in_flight["flush"] or not self._room("flush"):
            return
        others = len(self.pending)
        due = time.monotonic() - self.last_flush >= FLUSH_INTERVAL_S
        if not (due or others == 0):
            return
        ranges, self.unflushed = self.unflushed, []
        flushed = self.flush.remote(self.dst)
        self._track(flushed, _Pending("flush", [r for r, _ in ranges], ranges))
        self.last_flush = time.monotonic()

    def _plan(self, r: int) -> None:
        """Plan range ``r`` once both sides are hashed (and the seeds, for local copies)."""
        if r not in self.src_hashes or r not in self.dst_hashes or not self.seeds_hashed:
            return
        src, dst = self.src_hashes.pop(r), self.dst_hashes.pop(r)
        plan = plan_range(src, dst, self.index)
        moved = len(plan.zero) + len(plan.copy) + len(plan.send)
        self.report.blocks_unchanged += src.n_blocks - moved
        if plan.empty:
            self.dst_leaves.pop(r, None)
            self._verified(r, src.digest, dst.digest, written=False)
        else:
            self.src_digests[r] = src.digest
            self._queue_plan(plan)

    def _verified(self, r: int, source: bytes, target: bytes, *, written: bool) -> None:
        if target != source:
            log.warning("range %d of %s does not match its source after the sync", r, self.dst)
            self.report.ranges_unverified.append(r)
        elif written and self.durable:
            self.unflushed.append((r, target))
        else:
            self._record([(r, target)])

    def _record(self, ranges: list[tuple[int, bytes]]) -> None:
        for r, digest in ranges:
            self.checkpoint.mark_done(r, digest)
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.checkpoint)

    def _applied(self, result: ApplyResult) -> None:
        r = result.range_index
        self.report.bytes_received += len(result.digest) + len(result.leaves)
        if result.misses:
            self.report.misses += len(result.misses)
            self.kinds.subtract({"LOCAL_COPY": len(result.misses)})
            self.dst_leaves[r] = result.leaves
            self._queue_plan(RangePlan(r, send=result.misses))
        else:
            self.dst_leaves.pop(r, None)
            self._verified(r, self.src_digests.pop(r), result.digest, written=True)

    def _hashed(self, task: _Pending) -> None:
        digest_refs, seed, geometry = task.context
        for r, hashes in zip(task.ranges, ray.get(digest_refs), strict=True):
            self.report.bytes_read += geometry.range_extent(r)[1]
            if task.kind == "seed":
                self.index.add(seed, hashes)
            elif task.kind == "dst":
                self.dst_hashes[r] = hashes
                self.index.add(IMAGE, hashes)
                self.report.bytes_received += hashes.wire_size
            else:
                self.src_hashes[r] = hashes
        ready = task.ranges if task.kind != "seed" else []
        if task.kind == "seed" and self.seeds_hashed:
            ready = sorted(self.src_hashes.keys() & self.dst_hashes.keys())
        for r in ready:
            self._plan(r)

    def _done(self, ref: ObjectRef[Any], task: _Pending) -> None:
        report = self.report
        if task.kind in _HASHING:
            self._hashed(task)
        elif task.kind == "encode":
            encoded: EncodeStats = ray.get(ref)
            report.bytes_sent += encoded.size
            report.bytes_read += encoded.bytes_read
            self.kinds.update(encoded.kinds)
            self.apply_queue.append((task.ranges, task.context, encoded))
        elif task.kind == "apply":
            results: list[ApplyResult] = ray.get(ref)
            for result in results:
                self._applied(result)
        else:
            ray.get(ref)
            self._record(task.context)


def sync_file(
    src_path: str | os.PathLike[str],
    dst_path: str | os.PathLike[str],
    *,
    parallelism: int = 2,
    checkpoint: SyncCheckpoint | None = None,
    bandwidth_cap: float | None = None,
    link_bandwidth: float | None = None,
    seeds: Sequence[str | os.PathLike[str]] = (),
    source_host: str | None = None,
    target_host: str | None = None,
    host_nodes: Mapping[str, str] | None = None,
    on_checkpoint: Callable[[SyncCheckpoint], None] | None = None,
    durable: bool = True,
) -> SyncReport:
    """Make ``dst_path`` (on ``target_host``) a copy of ``src_path`` (on ``source_host``).

    ``parallelism`` is the number of parallel streams per host: each host gets twice as many tasks
    in flight, one queued behind each running one (a host with spare CPUs may run them all).
    ``source_host`` and ``target_host`` pin them to those hosts' Ray nodes (``host_nodes`` maps a
    logical host that has no node of its own to the node id it lives on). ``bandwidth_cap``
    (bytes/s) holds the frames to a budget; the zstd level follows the lower of the cap and
    ``link_bandwidth`` (the measured link speed). ``seeds`` are files on the target host whose
    blocks are copied locally instead of sent (an earlier copy, the template image). Resuming with
    ``checkpoint`` skips its verified ranges; the checkpoint of this run is passed to
    ``on_checkpoint`` as ranges are verified (and, when ``durable``, flushed to disk on the target
    host, every ``FLUSH_INTERVAL_S``). The report says whether the whole image was
    verified (``report.verified``); an unverified range (the source changed meanwhile) is left out
    of the checkpoint so that a second call redoes it.
    """
    if parallelism < 1:
        raise InvalidRequest("parallelism must be at least 1", details={"parallelism": parallelism})
    started = time.perf_counter()
    src, dst = os.fspath(src_path), os.fspath(dst_path)
    seed_paths = [os.fspath(s) for s in seeds]
    nodes = host_nodes or {}
    src_pin, dst_pin = _pin(source_host, nodes), _pin(target_host, nodes)
    size: int = ray.get(stat_image.options(**src_pin).remote(src))
    seed_sizes: list[int] = ray.get([stat_image.options(**dst_pin).remote(s) for s in seed_paths])
    if checkpoint is not None:
        if checkpoint.geometry.image_size != size:
            raise InvalidRequest(
                "checkpoint is for an image of another size",
                details={"checkpoint": checkpoint.geometry.image_size, "image": size},
            )
        state = SyncCheckpoint(checkpoint.geometry, dict(checkpoint.done))
    else:
        state = SyncCheckpoint(Geometry.for_size(size))
    geometry = state.geometry
    ray.get(prepare_target.options(**dst_pin).remote(dst, size))
    caps = [b for b in (bandwidth_cap, link_bandwidth) if b is not None]
    run = _SyncRun(
        src,
        dst,
        state,
        parallelism=parallelism,
        level=choose_zstd_level(min(caps) if caps else None),
        seeds=seed_paths,
        seed_geometries=[
            Geometry(s, geometry.block_size, geometry.range_blocks) for s in seed_sizes
        ],
        bucket=TokenBucket(bandwidth_cap) if bandwidth_cap is not None else None,
        pins=(src_pin, dst_pin),
        one_host=source_host == target_host,
        on_checkpoint=on_checkpoint,
        durable=durable,
    )
    report = run.run()
    report.duration_s = time.perf_counter() - started
    log.info(
        "synced %s -> %s: %d bytes sent, %d received, verified=%s in %.2fs",
        src,
        dst,
        report.bytes_sent,
        report.bytes_received,
        report.verified,
        report.duration_s,
    )
    return report
