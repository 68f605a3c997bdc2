"""Prompt-answer relevance with the packaged sentence encoder (all-MiniLM-L6-v2): an on-topic
answer scores clearly above an off-topic one, scores are cosines, order is kept."""

from __future__ import annotations

import pytest
import torch

from helpsteer_core.relevance import ENCODER, MAX_TOKENS, describe, embed, ratio_interval, relevance

pytestmark = pytest.mark.slow  # runs the packaged encoder (a few seconds on CPU)

SEASONS = "What causes the seasons on Earth?"
ON_TOPIC = (
    "The seasons come from the tilt of Earth's axis, about 23.5 degrees. As Earth orbits the Sun, "
    "each hemisphere leans toward the Sun for part of the year, getting more direct sunlight and "
    "longer days (summer), and leans away for the other part (winter)."
)
OFF_TOPIC = (
    "To bake sourdough bread, feed your starter the night before, mix flour, water and salt, "
    "stretch and fold the dough every half hour, let it proof overnight, and bake it in a hot "
    "Dutch oven until the crust is deep brown."
)


def test_an_on_topic_answer_scores_clearly_above_an_off_topic_one() -> None:
    on, off = relevance([SEASONS, SEASONS], [ON_TOPIC, OFF_TOPIC])
    assert on > 0.5 and off < 0.2 and on - off > 0.4


def test_scores_are_cosines_in_order_and_an_empty_answer_scores_zero() -> None:
    prompts = [SEASONS, "How do I bake sourdough bread?", SEASONS, SEASONS]
    answers = [OFF_TOPIC, OFF_TOPIC, ON_TOPIC, "  "]
    scores = relevance(prompts, answers, batch_size=2)  # two batches: order must survive them
    assert all(-1.0 <= s <= 1.0 for s in scores)
    assert scores[1] > 0.5 and scores[0] < 0.2 and scores[2] > 0.5  # the bread answer fits the bread prompt
    assert scores[3] == 0.0
    alone = relevance([prompts[2]], [answers[2]])
    assert alone[0] == pytest.approx(scores[2], abs=1e-5)  # padding in a batch does not change a score


def test_embeddings_are_unit_vectors_and_long_texts_are_truncated() -> None:
    vectors = embed([SEASONS, ON_TOPIC, "word " * 2000])
    assert vectors.dtype == torch.float32 and vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    longer = embed(["word " * 4000])  # both cut to the same MAX_TOKENS tokens
    assert torch.allclose(longer[0], vectors[2], atol=1e-5)
    assert str(MAX_TOKENS) in describe() and ENCODER in describe() and "mean" in describe()


def test_mismatched_lengths_are_an_error() -> None:
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        relevance([SEASONS, SEASONS], [ON_TOPIC])


def test_the_ratio_interval_resamples_prompts_in_pairs() -> None:
    """The tuned/untuned relevance ratio is a mean over a few prompts, each answered once: its 95%
    interval resamples the prompts, the same ones for both models (a prompt that is hard for both
    moves both means)."""
    baseline = [0.2, 0.8, 0.3, 0.7, 0.5, 0.6, 0.4, 0.9, 0.35, 0.65]
    same = ratio_interval(baseline, baseline)
    assert same == pytest.approx((1.0, 1.0))  # paired: identical answers leave no doubt
    tuned = [
        b * f for b, f in zip(baseline, [0.7, 1.1, 0.8, 1.0, 0.9, 1.2, 0.75, 0.95, 1.05, 0.85], strict=True)
    ]
    low, high = ratio_interval(tuned, baseline)
    point = sum(tuned) / sum(baseline)
    assert low < point < high and 0.8 < low and high < 1.05
    assert ratio_interval(tuned, baseline) == (low, high)  # seeded
    with pytest.raises(ValueError, match="pairs"):
        ratio_interval(tuned, baseline[:-1])
