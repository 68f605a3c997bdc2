"""Diagnostic: how many registers does the untuned generator write, told or shown?

    .venv/bin/python bench/registers.py [--questions 12] [--seed 7] [--max-new-tokens 160]

The complexity knob can only be learnt from answers whose registers differ, and the answers stage
(`helpsteer_core.answers`) gets them from the untuned generator itself. For each register style
that has an example (`answers.EXAMPLES`), in order, the packaged SmolLM2 answers `--questions`
bank questions two ways in one run, with the stage's decoding (T 0.7, top-p 0.95, repetition
penalty 1.1) and prompt template: *told*, the question with the style's instruction only, and
*shown*, the same after the example exchange the stage puts first (`AnswerRequest.turns`). Printed:
the median Flesch-Kincaid grade per style and arm, and the evaluation's own figure
(`helpsteer_core.steering.steerability`): Spearman's rho within question between the register's
rank and the grade.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from helpsteer_core.answers import EXAMPLES, STYLES, answer_requests, pick_questions  # noqa: E402
from helpsteer_core.conversation import Turn  # noqa: E402
from helpsteer_core.generator import SMOLLM2, generate_batch, load_generator  # noqa: E402
from helpsteer_core.sft_data import SFTDataConfig, generation_prompt_ids  # noqa: E402
from helpsteer_core.steering import measure, steerability  # noqa: E402

ARMS = ("told", "shown")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument(
        "--seed", type=int, default=7, help="which bank questions (the stage uses its own seed)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    styles = list(EXAMPLES)
    questions = pick_questions(args.questions, args.seed)
    requests = answer_requests(questions, styles)
    model, tokenizer = load_generator(SMOLLM2, torch.bfloat16)
    template = SFTDataConfig(template="chat")
    jobs = []
    for arm in ARMS:
        for request in requests:
            turns = request.turns() if arm == "shown" else [{"role": "User", "text": request.shown}]
            ids = generation_prompt_ids(
                [Turn(t["role"], t["text"]) for t in turns], None, tokenizer, template, max_new_tokens=0
            )
            jobs.append((arm, request, ids))
    started = time.perf_counter()
    texts: list[str] = []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        answers = generate_batch(
            model,
            tokenizer,
            [ids for _, _, ids in batch],
            args.max_new_tokens,
            temperature=0.7,
            top_p=0.95,
            seed=start,
            repetition_penalty=1.1,
        )
        texts += [a.text for a in answers]
        print(f"  {len(texts)}/{len(jobs)} answers, {time.perf_counter() - started:.0f} s", flush=True)

    rank = {style: i for i, style in enumerate(styles)}
    print(
        f"\n{args.questions} bank questions (seed {args.seed}), FK grade of the untuned generator's answers"
    )
    print("| style | instruction | told: median FK | shown: median FK |")
    print("|---|---|---|---|")
    records = {arm: [] for arm in ARMS}
    for (arm, request, _), text in zip(jobs, texts, strict=True):
        records[arm].append(
            {
                "prompt_id": questions.index(request.prompt),
                "attribute": "complexity",
                "level": rank[request.style],
                "style": request.style,
                **measure(text),
            }
        )
    for style in styles:
        medians = [
            statistics.median(r["fk_grade"] for r in records[arm] if r["style"] == style) for arm in ARMS
        ]
        print(f"| {style} | {STYLES[style]} | {medians[0]:.1f} | {medians[1]:.1f} |")
    for arm in ARMS:
        figure = steerability(records[arm], "complexity", "fk_grade")
        print(f"{arm}: Spearman within question (register rank vs FK) {figure['within_prompt']:.2f}")


if __name__ == "__main__":
    main()
