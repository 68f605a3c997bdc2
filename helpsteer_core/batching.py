"""Deterministic, length-grouped global batches for the training stages (APM and AC-SFT).

Training on a shuffled order wastes compute on padding when lengths vary (random batches of the
synthetic data padded to 3x their real tokens and trained 3x slower), and a resumed run must see
exactly the batches it would have seen. So each epoch's batches are a pure function of
(epoch, lengths, width, seed):

    batches = epoch_batches(epoch, lengths, width=rows_per_step, seed=0)  # lists of row indices
    mine = deal(batches[step_in_epoch], lengths, rank, world)              # this rank's rows

Nothing here imports ray, mlflow or deepspeed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

POOL_BATCHES = 50  # batches sorted together: longer pools pad less but mix lengths less within an epoch


def epoch_batches(epoch: int, lengths: Sequence[int], width: int, seed: int) -> list[list[int]]:
    """The global batches of one epoch: `width` row indices each, grouped by length.

    A seeded shuffle, cut into pools of `POOL_BATCHES` batches; each pool is sorted by length and
    cut into batches, and the batch order is shuffled again. Rows that do not fill a last batch
    of their pool are left out of this epoch (a different set each epoch).
    """
    if width < 1:
        raise ValueError(f"batch width {width}; must be at least 1")
    rng = np.random.default_rng(seed + epoch)
    order = rng.permutation(len(lengths)).tolist()
    pool = width * POOL_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order) - width + 1, pool):
        chunk = sorted(order[start : start + pool], key=lambda i: lengths[i])
        batches += [chunk[i : i + width] for i in range(0, len(chunk) - width + 1, width)]
    return [batches[i] for i in rng.permutation(len(batches))]


def deal(batch: Sequence[int], lengths: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's rows of a global batch, dealt round-robin by length so every rank pads alike."""
    return sorted(batch, key=lambda i: lengths[i])[rank::world]


__all__ = ["POOL_BATCHES", "deal", "epoch_batches"]
