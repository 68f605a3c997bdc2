"""Length-grouped global batches: deterministic per epoch, every row at most once, ranks alike."""

from __future__ import annotations

import random

import pytest

from helpsteer_core.batching import POOL_BATCHES, deal, epoch_batches


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 500) for _ in range(n)]


def test_batches_are_a_pure_function_of_epoch_and_seed() -> None:
    lengths = _lengths(1000)
    assert epoch_batches(3, lengths, 8, seed=1) == epoch_batches(3, lengths, 8, seed=1)
    assert epoch_batches(3, lengths, 8, seed=1) != epoch_batches(4, lengths, 8, seed=1)
    assert epoch_batches(3, lengths, 8, seed=1) != epoch_batches(3, lengths, 8, seed=2)


def test_every_batch_is_full_and_no_row_repeats_within_an_epoch() -> None:
    lengths = _lengths(1003)
    batches = epoch_batches(0, lengths, 8, seed=0)
    rows = [i for batch in batches for i in batch]
    assert all(len(batch) == 8 for batch in batches)
    assert len(rows) == len(set(rows)) and len(rows) >= 1003 - 8 * (1003 // (8 * POOL_BATCHES) + 1)


def test_grouping_by_length_pads_less_than_random_batches() -> None:
    lengths = _lengths(2000)

    def padded(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = epoch_batches(0, lengths, 8, seed=0)
    order = list(range(2000))
    random.Random(0).shuffle(order)
    shuffled = [order[i : i + 8] for i in range(0, 2000, 8)]
    assert padded(grouped) < 0.7 * padded(shuffled)


def test_deal_splits_a_batch_across_ranks_without_overlap() -> None:
    lengths = _lengths(64)
    [batch, *_] = epoch_batches(0, lengths, 8, seed=0)
    shares = [deal(batch, lengths, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(batch) and all(len(s) == 4 for s in shares)


def test_width_must_be_positive() -> None:
    with pytest.raises(ValueError, match="width"):
        epoch_batches(0, [1, 2, 3], 0, seed=0)
