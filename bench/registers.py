"""Diagnostic: how many registers does the untuned generator write, told or shown?

    .venv/bin/python bench/registers.py [--questions 12] [--seed 7] [--max-new-tokens 160]
        [--arms told shown shown_twice]

The complexity knob can only be learnt from answers whose registers differ, and the answers stage
(`helpsteer_core.answers`) gets them from the untuned generator itself. For each register style
that has an example (`answers.EXAMPLES`), in order, the packaged SmolLM2 answers `--questions`
bank questions in each arm asked (`--arms`, default told and shown) in one run, with the stage's
decoding (T 0.7, top-p 0.95, repetition penalty 1.1) and prompt template: *told*, the question
with the style's instruction only; *shown*, the same after the example exchange the stage puts
first (`AnswerRequest.turns`); *shown_twice*, after that exchange and a second one in the same
register on another question (`SECOND_EXAMPLES`, here only). Printed:
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

from helpsteer_core.answers import (  # noqa: E402
    EXAMPLES,
    STYLES,
    AnswerRequest,
    answer_requests,
    pick_questions,
)
from helpsteer_core.conversation import Turn  # noqa: E402
from helpsteer_core.generator import SMOLLM2, generate_batch, load_generator  # noqa: E402
from helpsteer_core.sft_data import SFTDataConfig, generation_prompt_ids  # noqa: E402
from helpsteer_core.steering import measure, steerability  # noqa: E402

ARMS = ("told", "shown", "shown_twice")
# A second example exchange for `shown_twice` (after the stage's own): does SmolLM2 spread the
# registers further when shown two answers in each? FK grades 0.1, 4.0, 26.2, 35.8.
SECOND_QUESTION = "How does a refrigerator keep food cold?"
SECOND_EXAMPLES = {
    "child_example": (
        "A fridge is a cold box. It has a special pump inside. The pump takes the warm air out. So the "
        "inside stays cold. Cold food stays fresh and yummy."
    ),
    "simple_example": (
        "A refrigerator moves heat from inside the box to the air outside. A liquid flows through pipes "
        "at the back and picks up heat as it turns into a gas. A pump squeezes the gas so it gives the "
        "heat away outside. Then it flows back in and does it again."
    ),
    "technical_example": (
        "A refrigerator operates on the vapor-compression cycle: a refrigerant absorbs heat from the "
        "insulated compartment as it evaporates at low pressure, a compressor raises its pressure and "
        "temperature, and a condenser rejects that heat to the surrounding air before an expansion "
        "valve returns the refrigerant to the evaporator."
    ),
    "specialist_example": (
        "Domestic refrigeration exploits the thermodynamic properties of hydrofluoroolefin or isobutane "
        "refrigerants within a reverse Rankine vapor-compression cycle, wherein isenthalpic throttling "
        "precipitates evaporative heat absorption at subatmospheric saturation temperatures, whereas "
        "hermetic reciprocating compression and subsequent condensation facilitate thermal rejection, "
        "the coefficient of performance being constrained by the Carnot limit."
    ),
}


def arm_turns(arm: str, request: AnswerRequest) -> list[dict[str, str]]:
    """The conversation one arm sends: the question told its instruction, after the stage's example
    exchange (shown), or after that and a second one on `SECOND_QUESTION` (shown twice)."""
    if arm == "told":
        return [{"role": "User", "text": request.shown}]
    turns = request.turns()
    if arm == "shown_twice":
        asked = f"{SECOND_QUESTION} {STYLES[request.style]}".strip()
        answer = SECOND_EXAMPLES[request.style]
        second = [{"role": "User", "text": asked}, {"role": "Assistant", "text": answer}]
        turns = turns[:-1] + second + turns[-1:]
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument(
        "--seed", type=int, default=7, help="which bank questions (the stage uses its own seed)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS[:2]))
    args = parser.parse_args()
    arms = list(dict.fromkeys(args.arms))

    styles = list(EXAMPLES)
    questions = pick_questions(args.questions, args.seed)
    requests = answer_requests(questions, styles)
    model, tokenizer = load_generator(SMOLLM2, torch.bfloat16)
    template = SFTDataConfig(template="chat")
    jobs = []
    for arm in arms:
        for request in requests:
            turns = arm_turns(arm, request)
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
    print("| style | instruction | " + " | ".join(f"{arm}: median FK" for arm in arms) + " |")
    print("|---|---|" + "---|" * len(arms))
    records: dict[str, list[dict]] = {arm: [] for arm in arms}
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
            statistics.median(r["fk_grade"] for r in records[arm] if r["style"] == style) for arm in arms
        ]
        print(f"| {style} | {STYLES[style]} | " + " | ".join(f"{m:.1f}" for m in medians) + " |")
    for arm in arms:
        figure = steerability(records[arm], "complexity", "fk_grade")
        print(f"{arm}: Spearman within question (register rank vs FK) {figure['within_prompt']:.2f}")


if __name__ == "__main__":
    main()
