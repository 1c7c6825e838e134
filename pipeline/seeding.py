"""The run's seeding rules, stated once for every reader and driver.

An epoch's shuffling comes from `epoch_seed(run seed, epoch)`, and each image's augmentation
from `augmentation_seed(epoch seed, sample id)`: both are functions of the run seed, the epoch
and the image's stable id alone, so a batch does not depend on which loader worker, Ray Data
task or process produced it, and a resumed run draws what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's shuffling (and, through `augmentation_seed`, its augmentation)."""
    return (seed * 1_000_003 + epoch) % (2**63)


def augmentation_seed(epoch_seed: int, sample_id: object) -> int:
    """Seed of one image's random transform in one epoch. A hash rather than arithmetic: ids
    may be strings (a source path) and neighbouring ids must not give correlated seeds."""
    digest = hashlib.blake2b(f"{epoch_seed}/{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)
