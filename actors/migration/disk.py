"""The disk of a live migration between sim hosts, kept in step with the running guest.

A delta sync (:func:`actors.sync_tasks.sync_file`) copies the image while the guest runs; a
:class:`~novacron.migration.diskblocks.DiskMirror` created just before it then follows the
guest's disk write generations, and each pre-copy pass sends the blocks written meanwhile beside
the memory pages; the planner counts the blocks still dirty as part of what the pause must move.
Once the guest is paused only the blocks written during the last pass are left: the pause reads a
few blocks and never hashes the image. This module writes the blocks on the target's host
(:func:`block_writer`) and, for ``policy.verify``, digests both images (:func:`disk_digests`).

Verification. With ``policy.verify`` the two images' BLAKE3 digests are computed while the guest is
paused (the target's on its host, in parallel with the source's) and compared before the guest
starts on the target: a mismatch fails the migration and the guest resumes on its source, nothing
lost. That pause lasts as long as reading the image and counts as downtime, which is why verify is
off by default. It is the only check that does not trust the write generations: a digest computed
before the pause, or kept up to date block by block from the dirty blocks, is only as right as the
dirty log it follows, and a check after the switchover could not give the guest back (the target
has run and written its disk by then). Without verify, every block the target holds was copied
after the last write the generations recorded for it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ray

from novacron.migration.blocks import file_image_digest
from novacron.migration.diskblocks import BlockBatch, write_blocks

# Every task takes a whole CPU, as the delta sync's do, so that they reuse its idle workers.


@ray.remote(num_cpus=1)
def write_blocks_task(path: str, batch: BlockBatch) -> int:
    """Write a batch of disk blocks on the target's node."""
    return write_blocks(path, batch)


@ray.remote(num_cpus=1)
def image_digest_task(path: str) -> str:
    """The BLAKE3 image digest of a disk image, on its node."""
    return file_image_digest(path).hex()


def block_writer(target: Path, pin: dict[str, Any], *, local: bool
                 ) -> Callable[[BlockBatch], int]:
    """What writes a batch into the target's image: in this process when ``local`` (the image
    is on this node), else a task placed by ``pin`` on the target's node."""
    if local:
        return partial(write_blocks, target)
    task: Any = write_blocks_task.options(**pin)
    return lambda batch: int(ray.get(task.remote(str(target), batch)))


def disk_digests(source: Path, target: Path, pin: dict[str, Any]) -> tuple[str, str]:
    """BLAKE3 image digests of the source image (here) and of the target image (by a task
    placed by ``pin`` on its node, meanwhile)."""
    on_target: Any = image_digest_task.options(**pin).remote(str(target))
    mine = file_image_digest(source).hex()
    return mine, str(ray.get(on_target))
