"""Migration data path: delta sync of images, page codecs, pre-copy planning, cost model.

Pure functions and small classes only (no Ray): ``actors/sync_tasks.py`` runs delta sync as Ray
tasks and the MigrationActor drives the rest.
"""

from __future__ import annotations

from novacron.migration.blocks import Geometry, RangeHashes, file_image_digest, hash_range
from novacron.migration.codecs import (
    BlockEncoder,
    FrameKind,
    PageDecoder,
    PageEncoder,
    choose_zstd_level,
    iter_frames,
    make_batch,
)
from novacron.migration.costmodel import Prediction, Workload, predict
from novacron.migration.delta import (
    ApplyResult,
    BlockIndex,
    RangePlan,
    SyncCheckpoint,
    SyncReport,
    apply_batch,
    encode_range,
    plan_range,
)
from novacron.migration.precopy import (
    Action,
    Decision,
    PassReport,
    PrecopyPolicy,
    PrecopyState,
    decide,
)
from novacron.migration.throttle import TokenBucket
from novacron.migration.xbzrle import PageCache

__all__ = [
    "Action",
    "ApplyResult",
    "BlockEncoder",
    "BlockIndex",
    "Decision",
    "FrameKind",
    "Geometry",
    "PageCache",
    "PageDecoder",
    "PageEncoder",
    "PassReport",
    "PrecopyPolicy",
    "PrecopyState",
    "Prediction",
    "RangeHashes",
    "RangePlan",
    "SyncCheckpoint",
    "SyncReport",
    "TokenBucket",
    "Workload",
    "apply_batch",
    "choose_zstd_level",
    "decide",
    "encode_range",
    "file_image_digest",
    "hash_range",
    "iter_frames",
    "make_batch",
    "plan_range",
    "predict",
]
