"""Diagnostic: how well could a model that copied its AC-SFT data steer? The labels' ceiling.

    .venv/bin/python bench/label_ceiling.py --rows runs/relabelled [--draws 200]

Before spending ~45 minutes of AC-SFT on a labelling, measure what it teaches. For each way
`attribute_source: apm_quantile` can turn the APM's predictions into levels (`sft.quantile_scope`
all or prompt, complexity at the whole answer's level or not, and where the whole answer's
prediction is read, `sft.answer_level_at`; see `helpsteer_core.sft_data.apm_levels`), an
imitator answers each training prompt at levels 0-4 by drawing one of that prompt's training rows
at the requested level, and the figure is the evaluation's own
(`helpsteer_core.steering.steerability`): Spearman's rho within prompt between the level and the
words (verbosity) or the Flesch-Kincaid grade (complexity), averaged over `--draws` draws. A
trained model does not do better than the rows it learns from, so a labelling under the bar here
cannot pass it after training. Also printed: the measure's mean per level and which answer styles
make up each level, and first, the bound no labelling of these rows can beat: levels that were the
answers' styles themselves, in register order (`STYLE_ORDERS`).
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from helpsteer_core.attributes import STEERLM  # noqa: E402
from helpsteer_core.readers import read_parquet_rows  # noqa: E402
from helpsteer_core.sft_data import apm_levels  # noqa: E402
from helpsteer_core.steering import measure, steerability  # noqa: E402

SWEEPS = {"verbosity": "words", "complexity": "fk_grade"}
# The evaluation's sweeps hold the other attribute at the profile's default (HelpSteer2's: 2).
DEFAULTS = {"verbosity": {"complexity": 2}, "complexity": {"verbosity": 2}}
SCHEMES: dict[str, dict[str, Any]] = {
    "all": {"scope": "all", "answer_level": ()},
    "all, complexity per answer": {"scope": "all", "answer_level": ("complexity",)},
    "prompt": {"scope": "prompt", "answer_level": ()},
    "prompt, complexity per answer": {"scope": "prompt", "answer_level": ("complexity",)},
    # Complexity per answer, read on the answer's first sentence (its one-sentence version, or the
    # answer itself when it has one sentence): every answer ranked at the same length
    # (`sft.answer_level_at: 1`).
    "all, complexity per answer at one sentence": {"scope": "all", "answer_level": ("complexity",), "at": 1},
    "prompt, complexity per answer at one sentence": {
        "scope": "prompt",
        "answer_level": ("complexity",),
        "at": 1,
    },
    # At two sentences (about the length the evaluation's complexity sweep asks for), and the mean
    # of the predictions on every version of the answer (1, 2, 4 sentences and whole).
    "all, complexity per answer at two sentences": {"scope": "all", "answer_level": ("complexity",), "at": 2},
    "all, complexity per answer, mean of its versions": {
        "scope": "all",
        "answer_level": ("complexity",),
        "at": "mean",
    },
}


def imitate(
    rows: Sequence[Mapping[str, Any]],
    levels: Sequence[Mapping[str, int]],
    attribute: str,
    rng: random.Random,
    others: Mapping[str, int],
) -> list[dict[str, Any]]:
    """One sweep of `attribute` per prompt, each level answered by one of the prompt's rows there
    whose other attributes are at `others` (the evaluation's defaults; {} for any row)."""
    by_prompt: dict[str, dict[int, list[int]]] = {}
    for index, (row, level) in enumerate(zip(rows, levels, strict=True)):
        if attribute in level and all(level.get(n) == v for n, v in others.items()):
            by_prompt.setdefault(row["prompt"], {}).setdefault(level[attribute], []).append(index)
    sweep = []
    for prompt_id, at_level in enumerate(by_prompt.values()):
        for level, members in at_level.items():
            sweep.append(
                {"prompt_id": prompt_id, "attribute": attribute, "level": level, "index": rng.choice(members)}
            )
    return sweep


def register_imitator(
    rows: Sequence[Mapping[str, Any]],
    levels: Sequence[Mapping[str, int]],
    measured: Sequence[Mapping[str, float]],
) -> str:
    """A model that writes, at each complexity level, the style most whole answers there have, at
    two sentences (about the length the defaults ask for): rho within prompt, grade by its style."""
    modal = {}
    for k in range(STEERLM.low, STEERLM.high + 1):
        styles = Counter(
            r["style"]
            for r, level in zip(rows, levels, strict=True)
            if r.get("first_sentences") is None and level.get("complexity") == k
        )
        modal[k] = styles.most_common(1)[0][0]
    rho = style_sweep_rho(rows, measured, modal)
    return f"register imitator ({', '.join(f'{k}: {s}' for k, s in modal.items())}): rho {rho:.2f}"


def style_sweep_rho(
    rows: Sequence[Mapping[str, Any]], measured: Sequence[Mapping[str, float]], styles: Mapping[int, str]
) -> float:
    """Spearman's rho within prompt of a complexity sweep that answers each training prompt at
    level k with its `styles[k]` answer at two sentences (the whole answer when it is shorter)."""
    at_two: dict[tuple[str, str], int] = {}
    for index, row in enumerate(rows):
        key = (row["prompt"], row["style"])
        if row.get("first_sentences") == 2 or (row.get("first_sentences") is None and key not in at_two):
            at_two[key] = index
    prompts = sorted({r["prompt"] for r in rows})
    sweep = [
        {
            "prompt_id": p,
            "attribute": "complexity",
            "level": k,
            "fk_grade": measured[at_two[(prompt, style)]]["fk_grade"],
        }
        for p, prompt in enumerate(prompts)
        for k, style in styles.items()
        if (prompt, style) in at_two
    ]
    return float(steerability(sweep, "complexity", "fk_grade")["within_prompt"])


# Labels that were the answers' styles themselves, in register order (what no APM labelling of
# these rows can beat): the bound for a model that learnt its rows perfectly.
STYLE_ORDERS = (
    ("child_example", "simple_example", "plain", "technical_example", "specialist_example"),
    ("child_example", "simple_example", "brief", "technical_example", "specialist_example"),
    ("child_example", "simple_example", "one_sentence", "technical_example", "specialist_example"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=Path, default=Path("runs/relabelled"))
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = read_parquet_rows(args.rows)
    measured = [measure(r["response"]) for r in rows]
    print(f"{len(rows)} rows, {len({r['prompt'] for r in rows})} prompts, from {args.rows}\n")
    present = {r.get("style") for r in rows}
    for order in STYLE_ORDERS:
        if set(order) <= present:
            rho = style_sweep_rho(rows, measured, dict(enumerate(order)))
            print(f"styles as levels ({', '.join(order)}): complexity rho {rho:.2f}")
    print()
    for name, scheme in SCHEMES.items():
        levels = apm_levels(
            rows, STEERLM, scheme["scope"], scheme["answer_level"], answer_at=scheme.get("at", "whole")
        )
        print(f"## {name}")
        for attribute, key in SWEEPS.items():
            rng = random.Random(args.seed)
            ceiling = {}
            for label, others in (("any row", {}), ("the other at its default", DEFAULTS[attribute])):
                figures = []
                for _ in range(args.draws):
                    sweep = imitate(rows, levels, attribute, rng, others)
                    for record in sweep:
                        record[key] = measured[record["index"]][key]
                    figures.append(steerability(sweep, attribute, key)["within_prompt"])
                ceiling[label] = f"{np.mean(figures):.2f} (sd {np.std(figures):.2f})"
            by_level: dict[int, list[int]] = {}
            for index, level in enumerate(levels):
                if attribute in level:
                    by_level.setdefault(level[attribute], []).append(index)
            means = " ".join(
                f"{np.mean([measured[i][key] for i in by_level[k]]):.1f}" for k in sorted(by_level)
            )
            print(f"{attribute}: imitator rho " + ", ".join(f"{v} from {k}" for k, v in ceiling.items()))
            if attribute == "complexity":
                print("  " + register_imitator(rows, levels, measured))
            print(f"  {key} by level: {means}")
            for k in sorted(by_level):
                styles = Counter(
                    f"{rows[i].get('style')}/{rows[i].get('first_sentences') or 'all'}" for i in by_level[k]
                )
                print(
                    f"  level {k}: {len(by_level[k])} rows: "
                    + ", ".join(f"{s} {n}" for s, n in styles.most_common(6))
                )
        print()


if __name__ == "__main__":
    main()
