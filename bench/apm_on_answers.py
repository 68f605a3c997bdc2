"""How an APM sees the generator's own answers, per style: the figures behind `apm_quantile`.

    .venv/bin/python bench/apm_on_answers.py --answers runs/answers --apm runs/apm

Scores every written answer (kept and rejected) with the APM and prints, per style, the mean
prediction of each trained attribute beside the words and Flesch-Kincaid grade of the text, then
Spearman's rho between the APM's verbosity and the words, and its complexity and the grade, over
all answers. Rounded predictions that bunch into a few levels are what `attribute_source:
apm_quantile` ranks into five equal shares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from helpsteer_core.apm import AttributePredictionModel, load_trained_attributes, predict
from helpsteer_core.attributes import STEERLM
from helpsteer_core.readers import read_parquet_rows
from helpsteer_core.steering import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--answers", type=Path, default=Path("runs/answers"))
    parser.add_argument("--apm", type=Path, default=Path("runs/apm"))
    args = parser.parse_args()
    rows = read_parquet_rows(args.answers / "kept")
    rejects = args.answers / "rejects" / "rejects.jsonl"
    rows += [json.loads(line) for line in rejects.read_text().splitlines()] if rejects.is_file() else []
    model = AttributePredictionModel.from_pretrained(args.apm, STEERLM)
    names = load_trained_attributes(args.apm, STEERLM)
    pred = predict(model, model.tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows])
    table: dict[str, list[list[float]]] = {}
    for row, values in zip(rows, pred, strict=True):
        text = measure(row["response"])
        figures = [float(values[STEERLM.index(n)]) for n in names] + [text["words"], text["fk_grade"]]
        table.setdefault(row["style"], []).append(figures)
    print("| style | answers | " + " | ".join(f"APM {n}" for n in names) + " | words | FK grade |")
    print("|---|---|" + "---|" * (len(names) + 2))
    for style, figures in table.items():
        means = np.asarray(figures).mean(axis=0)
        print(f"| {style} | {len(figures)} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    everything = np.asarray([f for figures in table.values() for f in figures])
    words, grade = everything[:, len(names)], everything[:, len(names) + 1]
    for name, measure_name, values in (("verbosity", "words", words), ("complexity", "FK grade", grade)):
        if name in names:
            rho = spearmanr(everything[:, names.index(name)], values)[0]
            print(f"\nSpearman, APM {name} vs {measure_name}, all {len(everything)} answers: {rho:.2f}")


if __name__ == "__main__":
    main()
