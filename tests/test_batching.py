"""Global batches: deterministic per epoch, each row at most once, grouped by length in pools, ranks alike."""

from __future__ import annotations

import random
import statistics

import pytest

from helpsteer_core.batching import batches_per_epoch, deal, epoch_batches


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(5, 500) for _ in range(n)]


def test_batches_are_a_pure_function_of_epoch_and_seed() -> None:
    lengths = _lengths(1000)
    for pool in (1, 50):
        assert epoch_batches(3, lengths, 8, 1, pool) == epoch_batches(3, lengths, 8, 1, pool)
        assert epoch_batches(3, lengths, 8, 1, pool) != epoch_batches(4, lengths, 8, 1, pool)
        assert epoch_batches(3, lengths, 8, 1, pool) != epoch_batches(3, lengths, 8, 2, pool)


def test_every_batch_is_full_and_no_row_repeats_within_an_epoch() -> None:
    lengths = _lengths(1003)
    for pool in (1, 50):
        batches = epoch_batches(0, lengths, 8, 0, pool)
        rows = [i for batch in batches for i in batch]
        assert all(len(batch) == 8 for batch in batches)
        assert len(rows) == len(set(rows)) and len(rows) >= 1003 - 8 * (1003 // (8 * pool) + 1)


def test_grouping_by_length_pads_less_than_random_batches() -> None:
    lengths = _lengths(2000)

    def padded(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped = epoch_batches(0, lengths, 8, 0, pool=50)
    order = list(range(2000))
    random.Random(0).shuffle(order)
    shuffled = [order[i : i + 8] for i in range(0, 2000, 8)]
    assert padded(grouped) < 0.7 * padded(shuffled)


def test_pool_of_one_mixes_lengths_in_every_step_and_groups_its_micro_batches() -> None:
    # The AC-SFT default: a step of only short (or only long) responses mis-teaches where a
    # response ends, so every global batch is a random sample of lengths.
    lengths = _lengths(2000)

    def spread_of_step_means(batches: list[list[int]]) -> float:
        return statistics.pstdev(statistics.mean(lengths[i] for i in b) for b in batches)

    mixed, grouped = epoch_batches(0, lengths, 8, 0, pool=1), epoch_batches(0, lengths, 8, 0, pool=50)
    assert spread_of_step_means(mixed) < 0.5 * spread_of_step_means(grouped)
    assert max(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in mixed) > 300

    # A rank's rows come sorted by length, so its consecutive micro-batches of 2 pad less than
    # the same rows in a random order would.
    def padded_micro(rows: list[int]) -> int:
        return sum(2 * max(lengths[i] for i in rows[k : k + 2]) for k in range(0, len(rows), 2))

    rng = random.Random(0)
    unsorted = sum(padded_micro(rng.sample(b, len(b))) for b in mixed)
    assert sum(padded_micro(deal(b, lengths, 0, 1)) for b in mixed) < 0.9 * unsorted


def test_deal_splits_a_batch_across_ranks_without_overlap() -> None:
    lengths = _lengths(64)
    [batch, *_] = epoch_batches(0, lengths, 8, 0, pool=1)
    shares = [deal(batch, lengths, rank, 2) for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(batch) and all(len(s) == 4 for s in shares)


def test_the_count_of_batches_is_known_from_the_number_of_rows_alone() -> None:
    """A driver counts a run's steps before any worker tokenizes: the count must be the one the
    workers cut, whatever the rows' lengths, epoch or seed."""
    rng = random.Random(5)
    for rows in (0, 1, 7, 8, 9, 63, 64, 65, 200, 1003):
        for width in (1, 3, 8, 16):
            for pool in (1, 4, 50):
                lengths = [rng.randint(1, 500) for _ in range(rows)]
                cut = {len(epoch_batches(e, lengths, width, seed, pool)) for e in (0, 3) for seed in (0, 9)}
                assert cut == {batches_per_epoch(rows, width, pool)}, (rows, width, pool)


def test_width_must_be_positive() -> None:
    with pytest.raises(ValueError, match="width"):
        epoch_batches(0, [1, 2, 3], 0, 0, pool=1)
    with pytest.raises(ValueError, match="pool"):
        epoch_batches(0, [1, 2, 3], 1, 0, pool=0)
    with pytest.raises(ValueError, match="width"):
        batches_per_epoch(3, 0, pool=1)
